"""Options of the ``distill`` plugin. No torch here: a wrong option is reported at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsframe.errors import ConfigError


@dataclass
class DistillConfig:
    description: ClassVar[str] = "knowledge distillation from a teacher: α·KL·τ² + (1-α)·CE, τ=3"
    teacher: str = "teacher"   # a finished stage of this run, or a path to a dsframe model file
    temperature: float = 3.0   # τ
    alpha: float = 0.7         # weight of the soft-label term
    hidden_weight: float = 0.0  # β: weight of the layer-to-layer hidden-state MSE (0 = logits only)

    def __post_init__(self):
        if not (self.temperature > 0):
            raise ConfigError("plugins.distill.temperature", self.temperature, "a float > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("plugins.distill.alpha", self.alpha, "a float in [0, 1]")
        if not self.hidden_weight >= 0.0:
            raise ConfigError("plugins.distill.hidden_weight", self.hidden_weight, "a float >= 0")
        if not self.teacher:
            raise ConfigError("plugins.distill.teacher", self.teacher, "a stage name or a model file path")
