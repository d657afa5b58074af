"""The recipe runner: runs a recipe's stages in order, each into ``<run_dir>/<stage>/``.

A stage that finished (``stage.json`` says done) is not redone on a rerun; a stage that was
interrupted resumes from its ``checkpoints/last.ckpt``. Every artifact is written atomically,
so a failure never damages what earlier stages left.
"""
from __future__ import annotations

import dataclasses
import json
import logging
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
from dsframe.errors import CheckpointError, ConfigError
from dsframe.io import write_json, write_text
from dsframe.models import file_size_mb, load_model, save_model
from dsframe.plugin import StageContext, order_plugins
from dsframe.strategies import forget_previous_job_port
from dsframe.task import TASKS

log = logging.getLogger("dsframe")

STAGE_FILE = "stage.json"


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
            return load_model(ctx.artifact(ctx.stage.init_from))
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
        trainer_cfg = spec.stage_trainer(name)
        factory = registry.strategies.get(spec.strategy.kind, key="strategy.kind")()
        factory.validate(spec.strategy, trainer_cfg.devices * trainer_cfg.num_nodes, model,
                         getattr(dm, "batch_size", None))
        factory.validate_plugins(spec.strategy, plugins)
        task = TASKS[spec.recipe.task](model, plugins, spec.stage_optim(name),
                                       **({"num_classes": dm.num_classes} if spec.recipe.task == "classification" else {}))
        ckpt_dir = ctx.stage_dir / "checkpoints"
        callbacks = [*plugins, ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)]
        if trainer_cfg.enable_progress_bar:
            callbacks.append(RichProgressBar(leave=True))
        forget_previous_job_port()
        trainer = pl.Trainer(**dataclasses.asdict(trainer_cfg),
                             strategy=factory.build(spec.strategy, trainer_cfg), callbacks=callbacks,
                             logger=CSVLogger(save_dir=ctx.stage_dir, name="logs", version="fit"),
                             default_root_dir=ctx.stage_dir, enable_model_summary=False)
        task.train()  # from_pretrained leaves modules in eval mode, and Lightning keeps each module's mode
        resume = ckpt_dir / "last.ckpt"
        if resume.exists():
            _check_checkpoint(resume, name)
            log.info("stage %s: resuming from %s", name, resume)
        trainer.fit(task, datamodule=dm, ckpt_path=str(resume) if resume.exists() else None)
        metrics = {"fit": _scalars(trainer.callback_metrics)}
        for plugin in plugins:
            model = plugin.finalize(model)
        task.model = model
        if ctx.stage.test:
            metrics["test"] = self.test(task, trainer_cfg, ctx)
        metrics["params"] = sum(p.numel() for p in model.parameters())
        if rank_zero_only.rank == 0:
            path = save_model(model, ctx.stage_dir / "model.pt", meta={"stage": name, "recipe": spec.recipe.name})
            metrics["model_mb"] = round(file_size_mb(path), 3)
            _plot_curves(ctx.stage_dir / "logs" / "fit" / "metrics.csv", ctx.stage_dir / "curves.png", name)
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


def _check_checkpoint(path: Path, stage: str) -> None:
    """Read the checkpoint once (weights only) so a damaged file is named, not a stack trace."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError("no state_dict inside")
    except Exception as exc:  # any unreadable file ends the same way
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot resume stage '{stage}' from {path}: the file is damaged or not a "
                              f"Lightning checkpoint ({reason}). Delete it to restart the stage; "
                              "earlier stages are kept.") from None


def _read_metrics(stage_dir: Path) -> dict:
    path = stage_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _plot_curves(csv_path: Path, png: Path, title: str) -> None:
    """Training loss and validation metrics against steps, for people who would rather look."""
    if not csv_path.exists():
        return
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
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
