"""``python -m dsframe``: compose the config with Hydra, check it, run the recipe."""
from __future__ import annotations

import logging
import os
import secrets
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dsframe.errors import DsframeError

log = logging.getLogger("dsframe")
# transformers imports torchao when present, which reports its CUDA-only kernels as missing
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def _quiet_lightning() -> None:
    """Lightning logs through its own stderr handler *and* Hydra's root handler: keep Hydra's."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lightning_log = logging.getLogger(name)
        for handler in list(lightning_log.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_log.removeHandler(handler)
        lightning_log.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdverts())

# Resolved once per run and cached with the config, so a sweep's jobs and a run's ranks agree.
OmegaConf.register_new_resolver("dsframe_uid", lambda: f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}",
                                use_cache=True, replace=True)


def _fail(exc: BaseException) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    print(f"dsframe: error: {exc}", file=sys.stderr)
    sys.exit(getattr(exc, "exit_code", 1))  # 143/130 after SIGTERM/SIGINT: a scheduler requeues the job


@hydra.main(version_base="1.3", config_path="pkg://dsframe.conf", config_name="config")
def run(cfg: DictConfig) -> float | None:
    from dsframe.config import validate

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        spec = validate(cfg)
    except DsframeError as exc:
        return _job_failed(exc, run_dir, started=False)
    from dsframe.runner import Runner  # torch + Lightning: only once the config is known good

    _quiet_lightning()

    try:
        log.info("run directory: %s", run_dir)
        results = Runner(spec, run_dir).run()
    except DsframeError as exc:
        return _job_failed(exc, run_dir, started=True)
    return _objective(results, spec.recipe.objective)


def _job_failed(exc: DsframeError, run_dir: Path, started: bool) -> None:
    """A single run ends with one line and exit 1. A sweep job is recorded as failed and the sweep
    goes on: its summary shows the row, and the sweep exits 1 at the end."""
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from dsframe.sweep import record_failure

        log.error("job failed: %s", exc)
        record_failure(run_dir, exc)
        return None
    if not started:
        _forget_empty_run_dir(run_dir)
    _fail(exc)
    return None


def _forget_empty_run_dir(run_dir: Path) -> None:
    """A run stopped by its config leaves no directory behind, unless it held earlier results:
    Hydra made it (config record and log) before dsframe could check anything."""
    import shutil

    if not run_dir.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in run_dir.iterdir()):
        return
    logging.shutdown()  # Hydra's file handler holds the log open
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent.name in ("outputs", "multirun") or parent.parent.name in ("outputs", "multirun"):
        try:
            parent.rmdir()  # only while empty: another run's results are never touched
        except OSError:
            break
        parent = parent.parent


def _objective(results: dict, declared: dict | None = None) -> float | list[float] | None:
    """What Hydra sweepers optimise: the recipe's ``objective`` (dsframe.sweep), else the last
    stage's test accuracy (or loss)."""
    if declared:
        from dsframe.sweep import flatten, objective_value, parse_objective

        return objective_value(flatten(results), parse_objective(declared))
    for metrics in reversed(list(results.values())):
        test = metrics.get("test", {}) if isinstance(metrics, dict) else {}
        for key in ("test/acc", "test/loss"):
            if key in test:
                return test[key]
    return None


def _summarize(args: list[str]) -> None:
    """``python -m dsframe summarize SWEEP_DIR``: rebuild a sweep's summary.csv/md/png."""
    from dsframe.sweep import summarize

    if len(args) != 1:
        print("usage: python -m dsframe summarize SWEEP_DIR", file=sys.stderr)
        sys.exit(2)
    try:
        result = summarize(args[0])
    except DsframeError as exc:
        _fail(exc)
    print(f"{result['summary']}: {result['jobs']} jobs, {result['failed']} failed, {result['incomplete']} incomplete")


_PRINT_ONLY = {"list", "--list", "summarize", "runs", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i"}


def _quiet_on_closed_pipe() -> None:
    """A command that only prints (``--help | head``) ends quietly when the reader stops reading,
    as Unix tools do, instead of with a BrokenPipeError traceback. Training runs keep Python's
    default: a closed pipe never kills them."""
    import signal

    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def main() -> None:
    args = sys.argv[1:]
    if _PRINT_ONLY & set(args[:1] + [a for a in args if a.startswith("-")]):
        _quiet_on_closed_pipe()
    if args and args[0] == "summarize":
        _summarize(args[1:])
        return
    if args and args[0] == "runs":
        from dsframe.records import main as runs

        sys.exit(runs(args[1:]))
    if args and args[0] in ("list", "--list"):
        from dsframe.catalog import print_catalog

        print_catalog()
        return
    if "--help" not in args and "-h" not in args:
        from dsframe.precheck import expand_args, unknown_key_message

        expanded = expand_args(args)
        if expanded != args:
            sys.argv[1:] = args = expanded

        message = unknown_key_message(args)
        if message:
            print(f"dsframe: error: {message}", file=sys.stderr)
            sys.exit(1)
    run()


if __name__ == "__main__":
    main()
