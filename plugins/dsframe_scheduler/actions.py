"""Actions acting on the running job.

* batch size: mid-epoch, through the core's resizable batch sampler (``dsframe.data.loaders.resize_batch``),
  with the LR rescaled by the configured rule (``dsframe.task.lr_scale_for``);
* precision and workers: through the runner's segments (``StageContext.end_segment``): this
  Trainer stops at a checkpoint and the stage continues in a new one with the new setting. A
  worker change keeps the per-worker batch (the global batch follows the worker count, as in the
  agent's and the simulator's model), and the LR follows the global batch.

Every rank calls ``apply`` with the same (broadcast) decision.
"""
from __future__ import annotations

from typing import Any

from dsframe.data.loaders import resize_batch
from dsframe.task import lr_scale_for

from dsframe_scheduler.agent import Setting


def current_setting(trainer: Any) -> Setting:
    """The setting the job runs with now (per-rank batch of the resizable sampler)."""
    from dsframe.data.loaders import train_batch_sampler

    sampler = train_batch_sampler(trainer)
    batch = sampler.batch_size if sampler is not None else int(getattr(trainer.datamodule, "batch_size", 1))
    precision = str(trainer.precision)
    precision = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}.get(precision, precision)
    return Setting(batch, precision, int(trainer.world_size))


def apply(new: Setting, old: Setting, trainer: Any, task: Any, context: Any, lr_rule: str,
          base_batch: int, noise_scale: float, reason: str) -> str:
    """Make ``new`` the job's setting. Returns how: "none", "batch" (in place) or "segment"."""
    if new == old:
        return "none"
    if hasattr(task, "lr_scale"):
        task.lr_scale = lr_scale_for(lr_rule, new.global_batch, base_batch, noise_scale)
    if new.workers == old.workers and new.precision == old.precision:
        if not resize_batch(trainer, new.batch_size):
            raise RuntimeError("the training loader cannot change its batch size (no ResizableBatchSampler)")
        return "batch"
    if new.batch_size != old.batch_size or new.workers != old.workers:
        resize_batch(trainer, new.batch_size, ranks=new.workers)
    changes = {}
    if new.precision != old.precision:
        changes["precision"] = new.precision
    if new.workers != old.workers:
        changes["devices"] = new.workers  # one node: workers are local ranks (devices)
    context.end_segment(trainer, reason=reason, **changes)
    return "segment"
