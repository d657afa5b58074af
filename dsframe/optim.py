"""Optimiser options: a module of its own so the config check imports no torch or Lightning
(a config error prints in about a second)."""
from __future__ import annotations

from dataclasses import dataclass

from dsframe.errors import ConfigError

#: the task kinds a recipe may name (``recipe.task``); ``dsframe.task.TASKS`` holds their classes
TASK_KINDS = ("classification", "lm")
LR_RULES = ("none", "linear", "sqrt", "adascale")  # how the LR follows a changed global batch


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
