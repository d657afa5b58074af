"""Lightning modules that train a dsframe model: one per kind of task.

The task owns the loss and the metrics; the model only maps a batch to logits; plugins
may add to or replace the loss through ``Plugin.loss``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from dsframe.batch import accepted_inputs, batch_size, model_inputs
from dsframe.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of the steps, then linear decay

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError("optim.lr", self.lr, "a float > 0")
        if self.weight_decay < 0:
            raise ConfigError("optim.weight_decay", self.weight_decay, "a float >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("optim.warmup_ratio", self.warmup_ratio, "a float in [0, 1)")


class Task(pl.LightningModule):
    kind: ClassVar[str] = ""

    def __init__(self, model: nn.Module, plugins: Sequence = (), optim: OptimConfig | None = None):
        super().__init__()
        self.model = model
        self.plugins = list(plugins)  # not submodules: their state (e.g. a teacher) stays out of checkpoints
        self.optim = optim or OptimConfig()
        self._inputs = accepted_inputs(model)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**model_inputs(batch, self._inputs))

    def compute_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Cross-entropy over the last dimension: [B, C] class logits or [B, T, V] token logits."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = self.compute_loss(logits, batch)
        for plugin in self.plugins:
            new = plugin.loss(self, batch, logits, loss)
            if new is not None:
                loss = new
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size(batch))
        self.on_train_logits(logits, batch)
        return loss

    def on_train_logits(self, logits: torch.Tensor, batch: dict) -> None:
        pass

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.optim.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.optim.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.optim.warmup_ratio)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ClassificationTask(Task):
    """Cross-entropy over class logits; accuracy and macro-F1 on val and test."""

    kind = "classification"

    def __init__(self, model: nn.Module, plugins: Sequence = (), optim: OptimConfig | None = None,
                 num_classes: int = 2):
        super().__init__(model, plugins, optim)
        metrics = lambda: torchmetrics.MetricCollection({  # noqa: E731
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes),
            "f1": torchmetrics.F1Score(task="multiclass", num_classes=num_classes, average="macro"),
        })
        self.train_metrics = metrics().clone(prefix="train/")
        self.val_metrics = metrics().clone(prefix="val/")
        self.test_metrics = metrics().clone(prefix="test/")

    def on_train_logits(self, logits, batch):
        self.train_metrics.update(logits.detach(), batch["labels"])
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)

    def _eval_step(self, batch, metrics, prefix):
        logits = self(batch)
        self.log(f"{prefix}/loss", F.cross_entropy(logits, batch["labels"]), batch_size=logits.shape[0],
                 sync_dist=True)
        metrics.update(logits, batch["labels"])
        self.log_dict(metrics, prog_bar=prefix == "val")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test")


class LMTask(Task):
    """Next-token cross-entropy; batches hold ``input_ids`` and ``labels`` (the shifted targets)."""

    kind = "lm"

    def _eval_step(self, batch, prefix):
        loss = self.compute_loss(self(batch), batch)
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size(batch))
        self.log(f"{prefix}/ppl", math.exp(min(loss.item(), 50.0)), sync_dist=True,
                 batch_size=batch_size(batch))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")


TASKS = {cls.kind: cls for cls in (ClassificationTask, LMTask)}

