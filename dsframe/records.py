"""Run records: what ran, where, with what, and how long each stage took.

:class:`RunRecord` (a Hydra callback, on by default) writes ``run.json`` into every run directory
when the job ends: status (done / failed), start and end time, the command-line overrides, the
versions of dsframe and its key dependencies, the git revision of the dsframe checkout (when it is
one), the machine (``dsframe.machine.machine_info()``: CPU model and flags, GPU), the wall time of
every stage, and the figures of ``metrics.json``. Next to it the runner has written the composed
config (``config.yaml``), the metrics and each stage's CSV logs. A run killed outright has no
``run.json``; ``python -m dsframe runs`` lists it as incomplete.

Nothing is written before the run ends, so a config error still leaves no run directory.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from dsframe.io import write_json

RECORD_FILE = "run.json"
#: distributions whose versions every record holds (those installed)
KEY_PACKAGES = ("dsframe", "torch", "lightning", "hydra-core", "omegaconf", "transformers", "torchmetrics",
                "onnxruntime", "onnx", "torchao", "optuna", "submitit", "tensorboard", "mlflow")

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in KEY_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def git_revision(path: Optional[Path] = None) -> Optional[dict]:
    """The commit of the git checkout holding ``path`` (default: the dsframe package) and whether it
    has uncommitted changes; None outside a checkout or without git."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Wall time of each finished stage, from its metrics.json (the runner times every stage)."""
    out = {}
    for stage_metrics in sorted(Path(run_dir).glob("*/metrics.json"), key=lambda p: p.stat().st_mtime):
        try:
            seconds = json.loads(stage_metrics.read_text()).get("seconds")
        except ValueError:
            continue
        if isinstance(seconds, (int, float)):
            out[stage_metrics.parent.name] = seconds
    return out


def build_record(run_dir: Path, status: str, started: float, overrides: list[str], error: str = "") -> dict:
    from dsframe.machine import machine_info

    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    recipe = _recipe_name(run_dir)
    ended = time.time()
    record: dict[str, Any] = {
        "recipe": recipe, "status": status,
        "started": _iso(started), "ended": _iso(ended), "wall_seconds": round(ended - started, 2),
        "overrides": overrides, "stages": stage_seconds(run_dir),
        "versions": versions(), "git": git_revision(), "machine": {**machine_info(), "host": socket.gethostname()},
        "metrics": metrics,
    }
    if error:
        record["error"] = error
    return record


def _recipe_name(run_dir: Path) -> str:
    from omegaconf import OmegaConf

    for cfg in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if cfg.exists():
            return str(OmegaConf.load(cfg).get("recipe", {}).get("name", ""))
    return ""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _is_rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "SLURM_PROCID"))


class RunRecord(_HydraCallback):
    """Hydra callback: ``run.json`` in the run directory when the job ends (rank 0 only)."""

    def __init__(self) -> None:
        self._pending: Optional[tuple[Path, float, list[str]]] = None
        self._atexit = False

    def on_job_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        self._pending = (Path(hydra_cfg.runtime.output_dir), time.time(), list(hydra_cfg.overrides.task))
        if not self._atexit:  # a single run that fails exits (SystemExit) without on_job_end
            atexit.register(self._at_exit)
            self._atexit = True

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        if self._pending is None:
            return
        run_dir, started, overrides = self._pending
        self._pending = None
        status = getattr(getattr(job_return, "status", None), "name", "COMPLETED")
        failed = run_dir / "failed.json"  # a sweep job that stopped with a DsframeError returns normally
        error = ""
        if failed.exists():
            error = json.loads(failed.read_text()).get("error", "")
        elif status == "FAILED":
            error = str(getattr(job_return, "_return_value", "")).strip().splitlines()[0:1]
            error = error[0] if error else "error"
        self._write(run_dir, "failed" if error or status == "FAILED" else "done", started, overrides, error)

    def _at_exit(self) -> None:
        if self._pending is None:
            return
        run_dir, started, overrides = self._pending
        self._pending = None
        if (run_dir / "config.yaml").exists():  # the run had started; a config error leaves nothing
            self._write(run_dir, "failed", started, overrides, "exited before the end (see cli.log)")

    @staticmethod
    def _write(run_dir: Path, status: str, started: float, overrides: list[str], error: str) -> None:
        if not _is_rank_zero() or not run_dir.is_dir():
            return
        try:
            write_json(run_dir / RECORD_FILE, build_record(run_dir, status, started, overrides, error))
        except Exception as exc:  # a record problem must never fail the run itself
            print(f"dsframe: warning: run record not written: {exc}", file=sys.stderr)


# -- python -m dsframe runs [DIR ...] ----------------------------------------------------------------
def find_runs(roots: list[Path], max_depth: int = 4) -> list[Path]:
    """Run directories (holding run.json, or a config.yaml next to .hydra/) under ``roots``."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        base = len(root.parts)
        for here, dirs, files in os.walk(root):
            path = Path(here)
            if RECORD_FILE in files or ("config.yaml" in files and ".hydra" in dirs):
                found.append(path)
                dirs[:] = []  # stage folders below are not runs
            elif len(path.parts) - base >= max_depth:
                dirs[:] = []
            else:
                dirs[:] = [d for d in dirs if not d.startswith(".")]
    return found


def run_row(run_dir: Path) -> dict[str, Any]:
    """recipe, status, date, wall time and key figures of one run directory."""
    from dsframe.sweep import figures_of, flatten, read_job

    record = {}
    if (run_dir / RECORD_FILE).exists():
        try:
            record = json.loads((run_dir / RECORD_FILE).read_text())
        except ValueError:
            record = {}
    config = run_dir / "config.yaml"
    started = record.get("started") or _iso((config if config.exists() else run_dir).stat().st_mtime)
    job = read_job(run_dir, set())
    metrics = flatten(record["metrics"]) if isinstance(record.get("metrics"), dict) else job.metrics
    declared = _declared_figures(run_dir)
    job.metrics = metrics
    figures = {f: metrics[f] for f in figures_of([job], {"figures": declared}) if f in metrics}
    if not figures:  # a run stopped before the declared figures exist: its last stage's test metrics
        figures = {f: metrics[f] for f in figures_of([job], {})}
    status = record.get("status") or ("failed" if job.status == "failed" else
                                      "done" if job.status == "done" else "incomplete")
    return {"dir": str(run_dir), "recipe": record.get("recipe") or _recipe_name(run_dir), "status": status,
            "started": started, "wall_seconds": record.get("wall_seconds"), "figures": figures,
            "error": record.get("error") or job.error}


def _declared_figures(run_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    for cfg in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if cfg.exists():
            node = OmegaConf.load(cfg).get("recipe", {}).get("summary", {}) or {}
            return [str(f) for f in (node.get("figures") or [])]
    return []


def _short(key: str) -> str:
    """``finetune.test.test/acc`` -> ``test/acc``; ``report.final_acc`` -> ``final_acc``."""
    return key.rsplit(".", 1)[-1]


def format_runs(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: r["started"], reverse=True)
    lines = [f"{'started (UTC)':<20} {'recipe':<20} {'status':<10} {'wall':>7}  figures / error  [run directory]"]
    for r in rows:
        wall = f"{r['wall_seconds']:.0f}s" if isinstance(r["wall_seconds"], (int, float)) else "-"
        figures = " ".join(f"{_short(k)}={v:.4g}" for k, v in r["figures"].items())
        if r["status"] == "failed" and r["error"]:
            figures = f"{figures} error: {r['error']}".strip()
        lines.append(f"{r['started'][:19].replace('T', ' '):<20} {r['recipe'] or '?':<20} {r['status']:<10} {wall:>7}  "
                     f"{figures}  [{r['dir']}]")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    """``python -m dsframe runs [DIR ...]``: past runs under DIR (default ./outputs and ./multirun), newest first."""
    if any(a.startswith("-") for a in args):
        print("usage: python -m dsframe runs [DIR ...]   (default: ./outputs ./multirun)", file=sys.stderr)
        return 2
    roots = [Path(a) for a in args] or [Path("outputs"), Path("multirun")]
    missing = [str(r) for r in roots if not r.is_dir()]
    if args and missing:
        print(f"dsframe: error: no such directory: {missing[0]}", file=sys.stderr)
        return 1
    runs = find_runs(roots)
    if not runs:
        print(f"no runs under {', '.join(str(r) for r in roots)}")
        return 0
    print(format_runs([run_row(d) for d in runs]))
    return 0
