"""Lightning modules that train a dsframe model: one per kind of task.

The task owns the loss and the metrics; the model only maps a batch to logits; plugins
may add to or replace the loss through ``Plugin.loss``.
"""
from __future__ import annotations

import math
from typing import ClassVar, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from dsframe.batch import accepted_inputs, batch_size, model_inputs
from dsframe.data.loaders import sync_epoch_length, train_batch_sampler
from dsframe.errors import ConfigError
from dsframe.optim import LR_RULES, OptimConfig  # noqa: F401  (OptimConfig re-exported: dsframe.task.OptimConfig)
from dsframe.plugin import Plugin


class Task(pl.LightningModule):
    """Training progress is counted in *samples*, not optimizer steps: ``samples_seen`` of
    ``total_samples`` (fixed when training first starts: the stage's estimated optimizer steps
    × the global batch then). The LR schedule and step-count plugins (prune) read ``progress``,
    so they stay right when the batch size changes mid-stage; ``lr_scale`` multiplies the
    scheduled LR (a batch-size change rescales it). All three are in the checkpoint."""

    kind: ClassVar[str] = ""

    def __init__(self, model: nn.Module, plugins: Sequence = (), optim: OptimConfig | None = None):
        super().__init__()
        self.model = model
        self.plugins = list(plugins)  # not submodules: their state (e.g. a teacher) stays out of checkpoints
        self.optim = optim or OptimConfig()
        self._inputs = accepted_inputs(model)
        self.samples_seen = 0
        self.dropping_step = False     # this step ran out of memory on some rank: no update
        self.total_samples = 0
        self.lr_scale = 1.0
        self._restored_global_batch = 0

    @property
    def progress(self) -> float:
        """Fraction of the stage's training done, in samples (0 before the schedule is known)."""
        return min(1.0, self.samples_seen / self.total_samples) if self.total_samples else 0.0

    def on_train_start(self) -> None:
        loop = self.trainer.fit_loop
        if getattr(loop, "_combined_loader_states_to_load", None) and hasattr(loop, "_load_combined_loader_states"):
            # A strategy that restores its checkpoint after setup (the hybrid strategy) has had the
            # train loader built by configure_optimizers (estimated_stepping_batches) before the
            # loop state was read, and Lightning hands a saved position only to a loader it builds
            # afterwards: without this, a resumed epoch would restart from its first batch.
            loop._load_combined_loader_states()
        sampler = train_batch_sampler(self.trainer)
        if sampler is not None and self._restored_global_batch:
            # Lightning restores a loader's position only inside an epoch; the batch size must
            # survive an epoch-end checkpoint too (the global batch: the rank count may differ)
            sampler.set_batch_size(max(1, self._restored_global_batch // sampler.ranks[1]))
        self._restored_global_batch = 0
        sync_epoch_length(self.trainer)  # a restored loader position changes the epoch's length

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        sampler = train_batch_sampler(self.trainer)
        if sampler is not None:
            sampler.mark_consumed(batch_idx)
            sync_epoch_length(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sampler = train_batch_sampler(self.trainer)
        global_batch = sampler.state_dict()["global_batch_size"] if sampler is not None else 0
        checkpoint["dsframe_progress"] = {"samples_seen": self.samples_seen, "total_samples": self.total_samples,
                                          "lr_scale": self.lr_scale, "global_batch": global_batch,
                                          "counted": "per_replica"}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("dsframe_progress")
        if state:
            self.samples_seen, self.total_samples = int(state["samples_seen"]), int(state["total_samples"])
            if state.get("counted") != "per_replica":
                # written before samples were counted per data-parallel replica: every tp/pp rank
                # was counted too. Such a checkpoint resumes in its own layout: rescale to that.
                extra = max(1, self.trainer.world_size // self.data_replicas())
                self.samples_seen, self.total_samples = self.samples_seen // extra, self.total_samples // extra
            self.lr_scale = float(state["lr_scale"])
            self._restored_global_batch = int(state.get("global_batch", 0))

    def _global_batch(self) -> int:
        sampler = train_batch_sampler(self.trainer)
        loader = self.trainer.train_dataloader
        local = sampler.batch_size if sampler is not None else getattr(loader, "batch_size", None) or 1
        return local * self.data_replicas() * self.trainer.accumulate_grad_batches

    def data_replicas(self) -> int:
        """Ranks that read different samples: every rank under DDP, only the data-parallel ones
        under tensor / pipeline parallelism (the tp and pp ranks of one replica share its batch).
        Counting samples by replicas keeps progress the same under any layout, so a checkpoint
        resumes under another one with the same LR schedule."""
        return int(getattr(self.trainer.strategy, "data_replicas", None) or self.trainer.world_size)

    def count_samples(self, batch: dict) -> None:
        """Add a trained batch (this rank's) to ``samples_seen`` for every replica."""
        self.samples_seen += batch_size(batch) * self.data_replicas()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**model_inputs(batch, self._inputs))

    def compute_loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Cross-entropy over the last dimension: [B, C] class logits or [B, T, V] token logits."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        oom = None
        try:
            logits = self(batch)
            loss = self.compute_loss(logits, batch)
            for plugin in self.plugins:
                new = plugin.loss(self, batch, logits, loss)
                if new is not None:
                    loss = new
        except Exception as exc:  # out of memory: a plugin may back off (smaller batch) and go on
            if not is_out_of_memory(exc):
                raise
            oom = exc
        if self._any_rank_out_of_memory(oom is not None):
            if not any([p.on_oom(self.trainer, self, batch) for p in self.plugins]):
                raise oom if oom is not None else RuntimeError("another rank ran out of memory")
            # the batch is dropped and its samples are not counted. One process: Lightning
            # skips the step. Several: Lightning refuses a skipped step, so every rank
            # back-propagates an exact zero through every trainable parameter (the gradient
            # all-reduce stays in step) and on_before_optimizer_step drops the gradients: the
            # optimizer changes nothing.
            if self.trainer.world_size <= 1:
                return None
            self.dropping_step = True
            zero = sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)
            return {"loss": zero, "dropped": True}
        self.count_samples(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size(batch))
        self.on_train_logits(logits, batch)
        return loss

    def on_train_logits(self, logits: torch.Tensor, batch: dict) -> None:
        pass

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.dropping_step:        # a dropped step (see training_step): no gradient, no update
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.dropping_step = False

    def _any_rank_out_of_memory(self, mine: bool) -> bool:
        """Whether any rank's step ran out of memory. Under several ranks, when a plugin can back
        off, every rank asks every step (one small collective), so all skip the step and back off
        alike instead of the others waiting in the gradient all-reduce."""
        handles = any(type(p).on_oom is not Plugin.on_oom for p in self.plugins)
        if not handles or self.trainer.world_size <= 1:
            return mine
        return bool(self.trainer.strategy.reduce_boolean_decision(mine, all=False))

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.optim.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.optim.lr)
        if not self.total_samples:  # the first segment fixes the schedule's length
            self.total_samples = max(1, int(self.trainer.estimated_stepping_batches)) * self._global_batch()
        warmup = self.optim.warmup_ratio

        def schedule(_step: int) -> float:
            # by samples, so the curve is the same whatever the batch size (the step is ignored):
            # linear warm-up to the LR of the next batch, then linear decay to 0 at total_samples
            seen, total, batch = self.samples_seen, self.total_samples, self._global_batch()
            if seen < warmup * total:
                factor = min(1.0, (seen + batch) / (warmup * total + batch))
            else:
                factor = max(0.0, (total - seen) / max(1.0, total * (1.0 - warmup)))
            return factor * self.lr_scale

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


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (CUDA) or host (CPU allocator) out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def lr_scale_for(rule: str, batch: int, base_batch: int, noise_scale: float = 0.0) -> float:
    """LR multiplier for a global batch ``batch`` trained with an LR tuned at ``base_batch``.

    ``linear`` (Goyal et al.): B/B0. ``sqrt`` (Krizhevsky; usual for Adam): sqrt(B/B0).
    ``adascale`` (Johnson et al. 2020, as Pollux uses it): the gain, written with the gradient
    noise scale B_noise = tr(Σ)/|G|², r = B(B_noise + B0) / (B0(B_noise + B)), between 1 (no noise: a bigger batch adds nothing) and B/B0 (pure noise: linear); without
    an estimate (``noise_scale`` <= 0) it falls back to ``sqrt``.
    """
    if rule not in LR_RULES:
        raise ConfigError("lr_rule", rule, f"one of {', '.join(LR_RULES)}")
    k = batch / base_batch
    if rule == "none":
        return 1.0
    if rule == "linear":
        return k
    if rule == "adascale" and noise_scale > 0:
        return batch * (noise_scale + base_batch) / (base_batch * (noise_scale + batch))
    return math.sqrt(k)


TASKS = {cls.kind: cls for cls in (ClassificationTask, LMTask)}

