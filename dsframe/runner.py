"""The recipe runner: runs a recipe's stages in order, each into ``<run_dir>/<stage>/``.

A stage that finished (``stage.json`` says done) is not redone on a rerun; a stage that was
interrupted resumes from its ``checkpoints/last.ckpt``. Every artifact is written atomically,
so a failure never damages what earlier stages left.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from dsframe import registry
from dsframe.config.schema import RunSpec
from dsframe.errors import CheckpointError, ConfigError, DsframeError
from dsframe.io import write_json, write_text
from dsframe.loggers import extra_loggers
from dsframe.models.files import file_size_mb, load_model, save_model
from dsframe.plugin import SEGMENT_CHECKPOINT, SEGMENT_REQUEST, SegmentSwitch, StageContext, order_plugins
from dsframe.resilience import (INTERRUPT_FILE, ContinuingCSVLogger, Interrupted, StageGuard, clear_pending_signal,
                                defer_signals, interval_checkpoints, pending_signal, raise_on_signals)
from dsframe.strategies import forget_previous_job_port, pick_local_port
from dsframe.task import TASKS

log = logging.getLogger("dsframe")

STAGE_FILE = "stage.json"
SEGMENTS_FILE = "segments.json"  # the trainer settings of each segment of a fit stage after the first


def is_done(stage_dir: Path) -> bool:
    marker = stage_dir / STAGE_FILE
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("status") == "done"
    except ValueError:
        return False


class Runner:
    def __init__(self, spec: RunSpec, run_dir: Path):
        self.spec = spec
        self.run_dir = Path(run_dir)
        self._datamodule = None

    # -- shared pieces --------------------------------------------------------------------
    @property
    def datamodule(self) -> pl.LightningDataModule:
        """Built once per run: every stage trains and tests on the same splits."""
        if self._datamodule is None:
            self._datamodule = registry.data.get(self.spec.data.kind, key="data.kind")(self.spec.data)
        return self._datamodule

    def context(self, name: str) -> StageContext:
        return StageContext(run_dir=self.run_dir, stage_name=name, cfg=self.spec.cfg,
                            stage=self.spec.recipe.stages[name], datamodule=self._datamodule,
                            results=self.results)

    # -- the run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.spec.threads:
            torch.set_num_threads(self.spec.threads)
        self.results: dict[str, Any] = {}
        self._save_config()
        raise_on_signals()  # outside a fit a signal stops the run at once (exit 143/130)
        for name, stage in self.spec.recipe.stages.items():
            stage_dir = self.run_dir / name
            if is_done(stage_dir):
                log.info("stage %s: already done, skipping (%s)", name, stage_dir)
                self.results[name] = _read_metrics(stage_dir)
                continue
            log.info("stage %s: %s", name, stage.description or stage.run)
            started = time.perf_counter()
            ctx = self.context(name)
            metrics = self.fit_stage(ctx) if stage.run == "fit" else self.function_stage(ctx)
            metrics["seconds"] = round(time.perf_counter() - started, 2)
            self.results[name] = metrics
            log.info("stage %s: done in %.1f s: %s", name, metrics["seconds"], _summary(metrics))
            if rank_zero_only.rank == 0:
                write_json(stage_dir / "metrics.json", metrics)
                write_json(stage_dir / STAGE_FILE, {"status": "done", "stage": name, "run": stage.run})
        if rank_zero_only.rank == 0:
            write_json(self.run_dir / "metrics.json", self.results)
        return self.results

    def function_stage(self, ctx: StageContext) -> dict:
        ctx.datamodule = self.datamodule
        fn = registry.stages.get(ctx.stage.run, key=f"recipe.stages.{ctx.stage_name}.run")
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        return dict(fn(ctx) or {})

    def build_model(self, ctx: StageContext) -> torch.nn.Module:
        if ctx.stage.init_from:
            return load_model(ctx.artifact(ctx.stage.init_from), expect_kind=self.spec.model.kind)
        config = self.spec.stage_model(ctx.stage_name)
        return registry.models.get(config.kind, key="model.kind").build(config)

    def fit_stage(self, ctx: StageContext) -> dict:
        spec, name = self.spec, ctx.stage_name
        pl.seed_everything(spec.seed, workers=True, verbose=False)
        model = self.build_model(ctx)
        dm = ctx.datamodule = self.datamodule
        _check_labels(model, dm)
        plugins = order_plugins([registry.plugins.get(p, key=f"recipe.stages.{name}.plugins")(spec.plugins[p], ctx)
                                 for p in ctx.stage.plugins])
        for plugin in plugins:
            model = plugin.transform(model)
        task = None
        ckpt_dir = ctx.stage_dir / "checkpoints"
        segments = _segments(ctx.stage_dir)
        port_retries = 0
        while True:  # one Trainer per segment; a plugin ends a segment with ctx.end_segment
            trainer_cfg = spec.stage_trainer(name, segments[-1]["trainer"] if segments else None)
            factory = registry.strategies.get(spec.strategy.kind, key="strategy.kind")()
            factory.validate(spec.strategy, trainer_cfg.devices * trainer_cfg.num_nodes, model,
                             getattr(dm, "batch_size", None))
            factory.validate_plugins(spec.strategy, plugins)
            if task is None:
                task = TASKS[spec.recipe.task](model, plugins, spec.stage_optim(name),
                                               **({"num_classes": dm.num_classes} if spec.recipe.task == "classification" else {}))
            guard = StageGuard(ctx.stage_dir, name, spec.seed, spec.checkpoint, spec.nonfinite_loss)
            callbacks = [*plugins, SegmentSwitch(ctx), guard,
                         ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                         enable_version_counter=False)]  # segments save last.ckpt too
            if trainer_cfg.enable_progress_bar:
                callbacks.append(RichProgressBar(leave=True))
            task.train()  # from_pretrained leaves modules in eval mode, and Lightning keeps each module's mode
            resume, resume_step = _resume_checkpoint(ckpt_dir, name, task)
            if resume is not None:
                log.info("stage %s: resuming from %s (step %d)", name, resume, resume_step)
            if rank_zero_only.rank == 0:
                (ctx.stage_dir / INTERRUPT_FILE).unlink(missing_ok=True)
            forget_previous_job_port()
            pick_local_port()
            version = "fit" if not segments else f"fit-{len(segments)}"
            start = segments[-1]["start_step"] if segments else 0
            logger = ContinuingCSVLogger(save_dir=ctx.stage_dir, name="logs", version=version,
                                         resume_step=resume_step if resume is not None and resume_step > start else None)
            trainer = pl.Trainer(**dataclasses.asdict(trainer_cfg),
                                 strategy=factory.build(spec.strategy, trainer_cfg), callbacks=callbacks,
                                 logger=[logger, *extra_loggers(spec.logger, ctx.stage_dir, version, spec.recipe.name)],
                                 default_root_dir=ctx.stage_dir, enable_model_summary=False)
            defer_signals()  # the ranks save a checkpoint at the next batch end, then the run exits
            try:
                trainer.fit(task, datamodule=dm, ckpt_path=str(resume) if resume is not None else None,
                            weights_only=True)  # a checkpoint is data, never code
            except Exception as exc:  # a rank of a multi-process fit died: one line, not its traceback
                if _port_taken(exc) and port_retries < 3 and pending_signal() is None:
                    # another process bound the port between its choice and rank 0's listen: nothing
                    # ran yet, so the ranks start again on another one
                    port_retries += 1
                    log.warning("stage %s: port %s was taken before the ranks met on it; starting them again "
                                "on another port", name, os.environ.pop("MASTER_PORT", "?"))
                    continue
                raise _rank_failure(exc, name, ckpt_dir) or exc
            finally:
                raise_on_signals()
            _check_interrupted(ctx.stage_dir, name)
            request = _segment_request(ctx.stage_dir, segments)
            if request is None:
                break
            segments.append({"start_step": request["global_step"], "reason": request.get("reason", ""),
                             "trainer": {**(segments[-1]["trainer"] if segments else {}), **request["trainer"]}})
            log.info("stage %s: segment %d from step %d with %s (%s)", name, len(segments), request["global_step"],
                     request["trainer"], request.get("reason", ""))
            if rank_zero_only.rank == 0:
                write_json(ctx.stage_dir / SEGMENTS_FILE, segments)
        metrics = {"fit": _scalars(trainer.callback_metrics), "global_step": _final_step(trainer, ckpt_dir)}
        for plugin in plugins:
            model = plugin.finalize(model)
        task.model = model
        if ctx.stage.test:
            metrics["test"] = self.test(task, spec.stage_trainer(name), ctx)
        metrics["params"] = sum(p.numel() for p in model.parameters())
        if rank_zero_only.rank == 0:
            path = save_model(model, ctx.stage_dir / "model.pt", meta={"stage": name, "recipe": spec.recipe.name})
            metrics["model_mb"] = round(file_size_mb(path), 3)
            logs = [ctx.stage_dir / "logs" / ("fit" if i == 0 else f"fit-{i}") / "metrics.csv"
                    for i in range(len(segments) + 1)]
            _plot_curves(logs, ctx.stage_dir / "curves.png", name)
        return metrics

    def test(self, task: pl.LightningModule, trainer_cfg: Any, ctx: StageContext) -> dict:
        """Test on one device: a DistributedSampler would pad the split with repeated samples."""
        tester = pl.Trainer(accelerator=trainer_cfg.accelerator, devices=1, num_nodes=1,
                            precision=trainer_cfg.precision, limit_test_batches=trainer_cfg.limit_test_batches,
                            enable_progress_bar=trainer_cfg.enable_progress_bar, enable_model_summary=False,
                            logger=CSVLogger(save_dir=ctx.stage_dir, name="logs", version="test"),
                            default_root_dir=ctx.stage_dir)
        tested = tester.test(task, datamodule=ctx.datamodule, verbose=False)
        return _scalars(tested[0] if tested else tester.callback_metrics)

    def _save_config(self) -> None:
        if rank_zero_only.rank == 0:
            write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.spec.cfg, resolve=True))


def _summary(metrics: dict) -> str:
    shown = {**metrics.get("test", {})}
    for key in ("params", "model_mb"):
        if key in metrics:
            shown[key] = metrics[key]
    if not shown:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "seconds"}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "ok"


def _check_labels(model: torch.nn.Module, dm: Any) -> None:
    head = getattr(model, "classifier", None)
    classes = getattr(dm, "num_classes", None)
    if isinstance(head, torch.nn.Linear) and classes is not None and head.out_features != classes:
        raise ConfigError("model.num_labels", head.out_features, f"{classes}, the number of classes of the data")


def _scalars(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = round(float(value), 6)
        elif isinstance(value, (int, float)):
            out[key] = round(float(value), 6)
    return out


def _resume_checkpoint(ckpt_dir: Path, stage: str, task: torch.nn.Module) -> tuple[Path | None, int]:
    """The checkpoint to continue from and its global step: the furthest of ``last.ckpt``, the
    checkpoint of a segment switch and the interval checkpoints (``step-N.ckpt``). At equal steps
    the latter two win: an ending Trainer rewrites ``last.ckpt`` at the same step, but as a
    finished fit that would start the next epoch."""
    paths = [ckpt_dir / f for f in ("last.ckpt", SEGMENT_CHECKPOINT) if (ckpt_dir / f).exists()]
    paths += [p for _, p in interval_checkpoints(ckpt_dir)]
    found = [(_check_checkpoint(p, stage, task, paths), p.name != "last.ckpt", p) for p in paths]
    if not found:
        return None, 0
    step, _, path = max(found)
    return path, step


def _final_step(trainer: pl.Trainer, ckpt_dir: Path) -> int:
    """The stage's last global step (forked ranks leave the launching process's trainer at 0)."""
    last = ckpt_dir / "last.ckpt"
    if trainer.global_step or not last.exists():
        return trainer.global_step
    return (_dcp_shapes(last) if last.is_dir() else _file_shapes(last))[1]


def _check_interrupted(stage_dir: Path, stage: str) -> None:
    """After a fit that a signal ended (the ranks saved and wrote ``interrupted.json``), or one
    the launching process was told to end: exit 128 + signal, so a scheduler requeues the job."""
    record_path = stage_dir / INTERRUPT_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    signum = record["signum"] if record else pending_signal()
    clear_pending_signal()
    if signum is None:
        return
    import signal as _signal

    name = _signal.Signals(signum).name
    where = (f"checkpoint at step {record['global_step']}: {record['checkpoint']}" if record
             else "no checkpoint written by this fit")
    raise Interrupted(signum, f"stage '{stage}' interrupted by {name}; {where}. Rerun the same command to resume.")


def _port_taken(exc: BaseException) -> bool:
    """Rank 0 of a forked fit could not listen on the rendezvous port (EADDRINUSE)."""
    from torch.multiprocessing.spawn import ProcessException

    return isinstance(exc, ProcessException) and "EADDRINUSE" in str(exc) and "MASTER_PORT" in os.environ


def _rank_failure(exc: BaseException, stage: str, ckpt_dir: Path) -> DsframeError | None:
    """A rank of a forked multi-process fit that died or raised, as one line (its DsframeError
    message when it raised one) naming the checkpoint a rerun resumes from."""
    from torch.multiprocessing.spawn import ProcessException

    if not isinstance(exc, ProcessException):
        return None
    found = interval_checkpoints(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    resume = found[-1][1] if found else (last if last.exists() else None)
    text = str(exc).strip().splitlines()
    own = [line for line in text if line.startswith(("dsframe.errors.", "dsframe.resilience."))]
    what = own[-1].split(": ", 1)[-1] if own else (text[-1] if text else type(exc).__name__)
    if own:
        return DsframeError(what)
    return DsframeError(f"stage '{stage}': a rank stopped ({what[:200]}); the other ranks were ended. "
                        f"Rerun the same command to resume from {resume or 'the start of the stage'}.")


def _check_checkpoint(path: Path, stage: str, task: torch.nn.Module, others: list[Path] = ()) -> int:
    """Read the checkpoint's tensor shapes once (weights only) so a damaged file, or one written by
    a differently shaped model, is named in one line instead of a stack trace; returns its global
    step. A folder is a distributed (DCP) checkpoint of a parallel run; only its metadata is read."""
    try:
        shapes, step = _dcp_shapes(path) if path.is_dir() else _file_shapes(path)
    except Exception as exc:  # any unreadable file ends the same way
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        kept = [p.name for p in others if p != path]
        then = f"to resume from {', '.join(kept)} instead" if kept else "to restart the stage"
        raise CheckpointError(f"cannot resume stage '{stage}' from {path}: the file is damaged or not a "
                              f"Lightning checkpoint ({reason}). Delete it {then}; earlier stages and "
                              "other checkpoints are kept.") from None
    expected = {k: tuple(v.shape) for k, v in task.state_dict().items()}
    differ = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    missing = [k for k in expected if k not in shapes]
    if differ or missing:
        what = (f"{differ[0]} is {list(shapes[differ[0]])} there but {list(expected[differ[0]])} in this stage's model"
                if differ else f"{len(missing)} of the model's {len(expected)} tensors are not in it (e.g. {missing[0]})")
        raise CheckpointError(f"cannot resume stage '{stage}' from {path}: it was written by a differently "
                              f"shaped model ({what}). Delete it to restart the stage; earlier stages are kept.")
    return step


def _file_shapes(path: Path) -> tuple[dict[str, tuple], int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError("no state_dict inside")
    shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    return shapes, int(ckpt.get("global_step", 0))


def _dcp_shapes(path: Path) -> tuple[dict[str, tuple], int]:
    from torch.distributed.checkpoint import FileSystemReader

    from dsframe.parallel.checkpoint import META, is_distributed_checkpoint

    if not is_distributed_checkpoint(path):
        raise ValueError("a folder without the .metadata of a distributed checkpoint")
    meta = torch.load(path / META, map_location="cpu", weights_only=True)  # Lightning's loop state must read too
    prefix = "state_dict."
    shapes = {k[len(prefix):]: tuple(m.size) for k, m in FileSystemReader(str(path)).read_metadata()
              .state_dict_metadata.items() if k.startswith(prefix) and hasattr(m, "size")}
    return shapes, int(meta.get("global_step", 0)) if isinstance(meta, dict) else 0


def _segments(stage_dir: Path) -> list[dict]:
    """The segments a stage has switched to so far (a rerun continues in the last one's settings)."""
    path = stage_dir / SEGMENTS_FILE
    segments = json.loads(path.read_text()) if path.exists() else []
    request = _segment_request(stage_dir, segments)
    if request is not None:  # asked for, checkpointed, but killed before the ledger was written
        segments.append({"start_step": request["global_step"], "reason": request.get("reason", ""),
                         "trainer": {**(segments[-1]["trainer"] if segments else {}), **request["trainer"]}})
    return segments


def _segment_request(stage_dir: Path, segments: list[dict]) -> dict | None:
    """A request for a new segment not yet acted on (the file stays: every process reads it)."""
    path = stage_dir / SEGMENT_REQUEST
    if not path.exists():
        return None
    request = json.loads(path.read_text())
    started = [s["start_step"] for s in segments]
    return request if not started or request["global_step"] > started[-1] else None


def _read_metrics(stage_dir: Path) -> dict:
    path = stage_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _plot_curves(csv_paths: list[Path], png: Path, title: str) -> None:
    """Training loss and validation metrics against steps (over all segments of the stage)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for csv_path in csv_paths:
        if not csv_path.exists():
            continue
        with open(csv_path) as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                for key, value in row.items():
                    if key in ("step", "epoch") or not value or not step:
                        continue
                    if key.startswith(("train/loss", "val/")):
                        series.setdefault(key, []).append((float(step), float(value)))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in sorted(series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3, label=key)
    ax.set_xlabel("step")
    ax.set_title(f"stage {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from dsframe.io import atomic_write

    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
