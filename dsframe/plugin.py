"""The plugin contract.

A plugin is a Lightning ``Callback`` (so it can use every training hook) with three more
optional hooks the recipe runner calls around one stage::

    model = plugin.transform(model)        # before fit: wrap, mask, load a teacher ...
    loss  = plugin.loss(task, batch, out, loss)   # every training step: add to / replace the loss
    model = plugin.finalize(model)         # after fit: physically drop channels, convert to int8
    handled = plugin.on_oom(trainer, task, batch)  # a step ran out of memory: back off, True = go on

A plugin may also end the current *segment* of a fit stage and have the runner continue it with
other trainer settings (precision, devices): ``self.context.end_segment(trainer, precision=...)``.

Plugins are found through the entry-point group ``dsframe.plugins``; a package registers one
in its ``pyproject.toml``::

    [project.entry-points."dsframe.plugins"]
    my_plugin = "my_package:MyPlugin"

and may ship ``conf/plugins/my_plugin.yaml`` (``# @package plugins.my_plugin``) through a
Hydra ``SearchPathPlugin``. Without a YAML file, the ``Config`` dataclass defaults apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from dsframe.errors import ConfigError, DsframeError
from dsframe.io import write_json


#: trainer settings a plugin may change between segments of a fit stage (``StageContext.end_segment``)
SEGMENT_KEYS = ("precision", "devices", "num_nodes", "accumulate_grad_batches")
#: the file in the stage directory through which rank 0 asks the runner for the next segment
SEGMENT_REQUEST = "segment_request.json"
#: the checkpoint taken at the switch (``last.ckpt`` is rewritten when the ending Trainer stops)
SEGMENT_CHECKPOINT = "segment.ckpt"


@dataclass
class NoOptions:
    """Config of a plugin that takes no options."""


@dataclass
class StageContext:
    """What a plugin or stage function may know about the run it is part of."""

    run_dir: Path
    stage_name: str
    cfg: Any  # the whole validated run config (DictConfig)
    stage: Any = None  # this stage's spec
    datamodule: Optional[pl.LightningDataModule] = None
    results: dict = field(default_factory=dict)  # metrics of the stages finished so far
    _deferred_segment: Optional[tuple] = field(default=None, repr=False)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage_name

    def end_segment(self, trainer: pl.Trainer, reason: str = "", **changes: Any) -> None:
        """End this segment of the fit stage; the runner continues the stage in a new Trainer
        with ``changes`` to the stage's trainer settings (keys in ``SEGMENT_KEYS``, e.g.
        ``precision="bf16-mixed"``, ``devices=2``).

        Call it from ``on_train_batch_end`` on *every* rank with the same arguments (decide on
        rank 0 and broadcast). It saves the checkpoint the next segment resumes from — weights,
        optimizer, LR schedule, loop counters, callback (plugin) state and the training loader's
        position — and stops this ``fit`` (without the validation Lightning runs on an early
        stop). At the last batch of an epoch the switch waits for the epoch's end (its
        validation included): Lightning resumes an epoch-end checkpoint correctly, not one
        taken inside the last batch. Rank 0 writes the request to the stage directory, so it
        reaches the launching process from forked ranks too.
        """
        bad = sorted(set(changes) - set(SEGMENT_KEYS))
        if bad:
            raise ConfigError(f"end_segment({bad[0]}=...)", changes[bad[0]], f"one of {', '.join(SEGMENT_KEYS)}")
        trainer.should_stop = True
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._deferred_segment = (changes, reason)  # SegmentSwitch.on_train_epoch_end finishes it
            return
        self._switch(trainer, changes, reason)
        trainer.limit_val_batches = 0  # this Trainer ends here; validation keeps its own schedule

    def _switch(self, trainer: pl.Trainer, changes: dict, reason: str) -> None:
        if trainer.is_global_zero:  # before the checkpoint's barrier: every rank then sees it
            write_json(self.stage_dir / SEGMENT_REQUEST, {"global_step": trainer.global_step,
                                                          "trainer": changes, "reason": reason})
        trainer.save_checkpoint(self.stage_dir / "checkpoints" / SEGMENT_CHECKPOINT)

    def options(self, schema: type) -> Any:
        """This stage's ``options`` as an instance of the stage function's ``schema`` dataclass
        (defaults filled in, types and ``__post_init__`` checks applied); an unknown key or a bad
        value is one ConfigError naming ``recipe.stages.<stage>.options.<key>``."""
        from dsframe.config.structured import to_dataclass

        raw = getattr(self.stage, "options", None) if self.stage is not None else None
        return to_dataclass(schema, dict(raw or {}), f"recipe.stages.{self.stage_name}.options")

    def artifact(self, stage_name: str, filename: str = "model.pt") -> Path:
        """A file written by an earlier stage of this run; a clear error if it is not there."""
        path = self.run_dir / stage_name / filename
        if not path.exists():
            raise DsframeError(f"stage '{self.stage_name}' needs {filename} from stage '{stage_name}', "
                               f"which has not produced it ({path})")
        return path


class Plugin(pl.Callback):
    """Base class of dsframe plugins. Subclasses set ``name``, ``description`` and ``Config``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type] = NoOptions
    #: names of plugins that cannot run in the same stage as this one
    conflicts_with: ClassVar[tuple[str, ...]] = ()
    #: names of plugins that, when in the same stage, must run before this one (its hooks, ``loss`` included)
    runs_after: ClassVar[tuple[str, ...]] = ()
    #: names of plugins that, when in the same stage, must run after this one: lets an outside plugin
    #: place itself before a first-party one without that plugin knowing it
    runs_before: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None, context: Optional[StageContext] = None):
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.context = context

    def transform(self, model: nn.Module) -> nn.Module:
        """Change the model before training; return the model to train."""
        return model

    def loss(self, task: pl.LightningModule, batch: dict, outputs: torch.Tensor,
             loss: torch.Tensor) -> Optional[torch.Tensor]:
        """Return a new total loss (e.g. ``loss + term``), or None to leave it unchanged.

        ``task``: the training ``Task`` (``task.log``, ``task.progress``, ``task.trainer``);
        ``batch``: the flat dict of tensors (``labels`` plus the data module's inputs, e.g.
        ``input_ids``/``attention_mask``); ``outputs``: the model's logits, [B, C] for
        classification, [B, T, V] for language modelling; ``loss``: the total so far — the task's
        cross-entropy for the first plugin, then what the previous plugin returned (order:
        ``order_plugins``)."""
        return None

    def finalize(self, model: nn.Module) -> nn.Module:
        """Change the model after training; the returned model is saved as the stage artifact."""
        return model

    def on_oom(self, trainer: pl.Trainer, task: pl.LightningModule, batch: dict) -> bool:
        """A training step ran out of memory. Return True if this plugin made the next step
        fit (e.g. a smaller batch): the task then drops this batch and training goes on;
        if no plugin does, the error ends the run as before."""
        return False

    def state_dict(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class SegmentSwitch(pl.Callback):
    """Added by the runner to every fit: finishes a segment switch asked for at an epoch's last
    batch once the epoch has ended (see ``StageContext.end_segment``)."""

    def __init__(self, context: StageContext):
        self.context = context

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        deferred, self.context._deferred_segment = self.context._deferred_segment, None
        if deferred is not None:
            self.context._switch(trainer, *deferred)


def order_plugins(plugins: list[Plugin]) -> list[Plugin]:
    """Check conflicts, then order so each plugin runs after those it declares in ``runs_after`` and
    before those it declares in ``runs_before``; otherwise the stage's listed order is kept.

    Plugins compose in any listed order: the declared dependencies, not the config, decide. The
    result is the order of every hook: ``transform``, the ``loss`` chain, callbacks, ``finalize``.
    """
    names = {p.name for p in plugins}
    for p in plugins:
        clash = sorted(names & set(p.conflicts_with))
        if clash:
            raise DsframeError(f"plugin '{p.name}' cannot run in the same stage as {', '.join(clash)}: "
                               "put them in separate stages")
    ordered: list[Plugin] = []
    pending = list(plugins)
    while pending:
        ready = [p for p in pending if not any(q is not p and (q.name in p.runs_after or p.name in q.runs_before)
                                               for q in pending)]
        if not ready:
            raise DsframeError("plugins " + ", ".join(p.name for p in pending) + " each wait for another (runs_after cycle)")
        ordered.append(ready[0])
        pending.remove(ready[0])
    return ordered
