"""Options of the ``prune`` plugin. No torch here: a wrong option is reported at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from dsframe.errors import ConfigError


@dataclass
class PruneConfig:
    description: ClassVar[str] = "gradual structured pruning (L1 + Taylor) that physically removes heads and FFN channels"
    amount: float = 0.5            # fraction of heads and of FFN channels removed, in [0, 1)
    head_amount: Optional[float] = None  # override for heads only (null: = amount)
    ffn_amount: Optional[float] = None  # override for FFN channels only (null: = amount)
    taylor_weight: float = 0.5     # λ in (1-λ)·L1 + λ·Taylor; 0 = pure L1, 1 = pure Taylor
    start_fraction: float = 0.0    # schedule starts at this fraction of the stage's steps
    end_fraction: float = 0.6      # ... and reaches `amount` here; the rest fine-tunes
    every_n_steps: int = 10        # re-rank and grow the masks every n optimizer steps
    taylor_decay: float = 0.9      # EMA decay of the Taylor statistic
    drop_layers: int = 0           # whole encoder layers removed before training (lowest Taylor score
                                   # over `calibration_batches` training batches); distillation recovers
    calibration_batches: int = 8

    def __post_init__(self):
        for key in ("amount", "head_amount", "ffn_amount"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, (int, float)) and 0.0 <= float(v) < 1.0):
                raise ConfigError(f"plugins.prune.{key}", v, "a fraction in [0, 1)")
        if not 0.0 <= self.taylor_weight <= 1.0:
            raise ConfigError("plugins.prune.taylor_weight", self.taylor_weight, "a float in [0, 1]")
        if not 0.0 <= self.start_fraction <= self.end_fraction <= 1.0:
            raise ConfigError("plugins.prune.end_fraction", self.end_fraction,
                              f"a float in [start_fraction={self.start_fraction}, 1]")
        if self.every_n_steps < 1:
            raise ConfigError("plugins.prune.every_n_steps", self.every_n_steps, "an integer >= 1")
        if self.drop_layers < 0:
            raise ConfigError("plugins.prune.drop_layers", self.drop_layers, "an integer >= 0")
        if self.calibration_batches < 1:
            raise ConfigError("plugins.prune.calibration_batches", self.calibration_batches, "an integer >= 1")
        if not 0.0 <= self.taylor_decay < 1.0:
            raise ConfigError("plugins.prune.taylor_decay", self.taylor_decay, "a float in [0, 1)")

    @property
    def heads(self) -> float:
        return self.amount if self.head_amount is None else self.head_amount

    @property
    def ffn(self) -> float:
        return self.amount if self.ffn_amount is None else self.ffn_amount
