"""The plugin contract.

A plugin is a Lightning ``Callback`` (so it can use every training hook) with three more
optional hooks the recipe runner calls around one stage::

    model = plugin.transform(model)        # before fit: wrap, mask, load a teacher ...
    loss  = plugin.loss(task, batch, out, loss)   # every training step: add to / replace the loss
    model = plugin.finalize(model)         # after fit: physically drop channels, convert to int8

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

from dsframe.errors import DsframeError


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

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.stage_name

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
    #: names of plugins that, when in the same stage, must be listed before this one
    runs_after: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None, context: Optional[StageContext] = None):
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.context = context

    def transform(self, model: nn.Module) -> nn.Module:
        """Change the model before training; return the model to train."""
        return model

    def loss(self, task: pl.LightningModule, batch: dict, outputs: torch.Tensor,
             loss: torch.Tensor) -> Optional[torch.Tensor]:
        """Return a new total loss (e.g. ``loss + term``), or None to leave it unchanged."""
        return None

    def finalize(self, model: nn.Module) -> nn.Module:
        """Change the model after training; the returned model is saved as the stage artifact."""
        return model

    def state_dict(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def order_plugins(plugins: list[Plugin]) -> list[Plugin]:
    """Check conflicts, then order so each plugin runs after those it declares in ``runs_after``.

    Plugins compose in any listed order: the declared dependencies, not the config, decide.
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
        ready = [p for p in pending if not (set(p.runs_after) & {q.name for q in pending if q is not p})]
        if not ready:
            raise DsframeError("plugins " + ", ".join(p.name for p in pending) + " each wait for another (runs_after cycle)")
        ordered.append(ready[0])
        pending.remove(ready[0])
    return ordered
