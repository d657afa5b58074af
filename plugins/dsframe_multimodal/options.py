"""Options of the multimodal_digits stage functions (``recipe.stages.<name>.options``). No torch
here: every value is checked when the config is, before the first stage trains."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from dsframe.checks import integers_at_least
from dsframe.errors import ConfigError


@dataclass
class ReportOptions:
    description: ClassVar[str] = "report.json, report.md and PNGs of the multimodal run (mean ± std over seeds)"
    source: str = "evaluate"


@dataclass
class EvaluateOptions:
    description: ClassVar[str] = "accuracies (val, test), missing-modality accuracies, gate weights, fusion latency, per seed"
    baselines: List[str] = field(default_factory=lambda: ["text", "image", "audio"])  # unimodal fit stages
    fused: List[str] = field(default_factory=lambda: ["fused"])  # fused fit stages; the first is "the" model
    seeds_stage: Optional[str] = "seeds"  # the multimodal_seeds stage whose runs are evaluated too (null: none)
    examples: int = 8                     # test samples whose per-sample gate weights are listed
    latency_reps: int = 50                # timed batch-1 calls per part (median)
    latency_threads: int = 1

    def __post_init__(self):
        if not self.fused:
            raise ConfigError("options.fused", list(self.fused), "at least one fused fit stage")
        integers_at_least(self, "options", ("examples",), 0)
        integers_at_least(self, "options", ("latency_reps", "latency_threads"))


@dataclass
class SeedsOptions:
    description: ClassVar[str] = "reruns the fit stages under more seeds (one nested run per seed)"
    extra: int = 2                                   # seeds run_seed+1 .. run_seed+extra
    stages: List[str] = field(default_factory=list)  # fit stages to retrain (default: all before this one)

    def __post_init__(self):
        if self.extra < 0:
            raise ConfigError("options.extra", self.extra, "an integer >= 0")
