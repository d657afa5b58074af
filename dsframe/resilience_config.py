"""The ``checkpoint`` and ``nonfinite_loss`` config groups, apart from ``dsframe.resilience`` so that
checking a config needs neither torch nor Lightning (a wrong key is reported in a second or two)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dsframe.errors import ConfigError

NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class CheckpointConfig:
    """Checkpoints during a fit stage (besides ``last.ckpt`` at its end)."""

    every_n_steps: Optional[int] = None  # null: by time only
    every_minutes: Optional[float] = 10.0  # null: by steps only
    keep_last: int = 2  # interval checkpoints kept; older ones are deleted once a newer one is written

    def __post_init__(self):
        if self.every_n_steps is not None and (isinstance(self.every_n_steps, bool) or self.every_n_steps < 1):
            raise ConfigError("checkpoint.every_n_steps", self.every_n_steps, "null or an integer >= 1")
        if self.every_minutes is not None and not self.every_minutes > 0:
            raise ConfigError("checkpoint.every_minutes", self.every_minutes, "null or a number of minutes > 0")
        if self.keep_last < 1:
            raise ConfigError("checkpoint.keep_last", self.keep_last, "an integer >= 1")


@dataclass
class NonFiniteLossConfig:
    """What a NaN/Inf training loss does: stop the stage, or skip that batch's update (up to a limit)."""

    policy: str = "stop"  # stop: end the stage naming the step and the last good checkpoint | skip: drop that update
    max_skips: int = 10  # with policy skip: more skipped batches than this in one stage stop it

    def __post_init__(self):
        if self.policy not in NONFINITE_POLICIES:
            raise ConfigError("nonfinite_loss.policy", self.policy, f"one of {', '.join(NONFINITE_POLICIES)}")
        if self.max_skips < 0:
            raise ConfigError("nonfinite_loss.max_skips", self.max_skips, "an integer >= 0")
