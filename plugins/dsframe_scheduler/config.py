"""Options of the ``scheduler`` plugin. No torch here: a wrong option is reported at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from dsframe.checks import integers_at_least
from dsframe.errors import ConfigError
from dsframe.optim import LR_RULES
from dsframe_scheduler.advisor import ADVISOR_MODES, check_trace_folder
from dsframe_scheduler.agent import ACTIONS, PRECISIONS, REWARD_FORMS, Limits, StateBins


def _gpu_available() -> bool:
    try:
        # only when max_batch is left unset: the common case stays torch-free. Counted without
        # initialising CUDA (the config is checked in the parent, which may fork training ranks)
        from dsframe.machine import gpu_count
        return gpu_count() > 0
    except Exception:
        return False


@dataclass
class SchedulerConfig:
    description: ClassVar[str] = ("Q-learning scheduler: changes batch size (mid-epoch), precision and "
                                  "workers of the running job")
    every_n_steps: int = 20          # a decision every n optimizer steps
    min_steps_between: int = 20      # cooldown: no change within n steps of the last one
    min_batch: int = 1               # per-worker batch size guard rails
    max_batch: Optional[int] = None  # required on a CPU (nothing runs out of memory to stop growth)
    batch_factor: float = 2.0        # batch_up multiplies, batch_down divides by this
    precisions: List[str] = field(default_factory=lambda: ["32-true", "bf16-mixed"])
    min_workers: int = 1             # workers = local ranks (trainer.devices)
    max_workers: int = 1             # 1 = never add any
    lr_rule: str = "sqrt"            # LR rescaling when the global batch changes: none|linear|sqrt|adascale
    lam: float = 0.0                 # λ: value of time in J = worker·s + λ·s
    reward_form: Optional[str] = None  # rate | cost; null: the policy file's form, else rate
    alpha: float = 0.1
    gamma: float = 0.9
    eps_start: float = 0.3
    eps_end: float = 0.05
    eps_decay_decisions: int = 200
    hysteresis: float = 0.05         # another action replaces keep only if better by this fraction
    max_moves: int = 1               # actions the agent may chain at one decision (one restart for all)
    warm_start: bool = True          # the article's conservative start: utilisation > threshold -> scale up
    utilisation_threshold: float = 0.7
    policy: Optional[str] = None     # a trained Q-table (JSON policy file) to start from
    learn: bool = True               # update the Q-table during the run
    forced_actions: List[str] = field(default_factory=list)  # demo: the first decisions take these actions
    bins: Dict[str, Any] = field(default_factory=dict)        # StateBins overrides
    monitor: Optional[str] = None    # "module:factory" of a device monitor; null = NVML / this CPU
    oom_penalty: float = 1.0
    advisor: str = "auto"            # the state's advice: auto (measured step times, + advisor_trace) | trace | off
    advisor_trace: Optional[str] = None  # a trace folder (AdaptDL layout) for the advisor's step-time model
    seed: int = 0

    def __post_init__(self):
        key = "plugins.scheduler."
        for name in ("every_n_steps", "min_batch", "min_workers", "eps_decay_decisions", "max_moves"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(key + name, getattr(self, name), "an integer >= 1")
        if self.min_steps_between < 0:
            raise ConfigError(key + "min_steps_between", self.min_steps_between, "an integer >= 0")
        if self.max_batch is None and not _gpu_available():
            raise ConfigError(key + "max_batch", None, f"an integer >= min_batch ({self.min_batch}): required "
                              "on a CPU, where no out-of-memory error stops a growing batch")
        if self.max_batch is not None and self.max_batch < self.min_batch:
            raise ConfigError(key + "max_batch", self.max_batch, f"an integer >= min_batch ({self.min_batch})")
        if self.max_workers < self.min_workers:
            raise ConfigError(key + "max_workers", self.max_workers, f"an integer >= min_workers ({self.min_workers})")
        if not self.batch_factor > 1.0:
            raise ConfigError(key + "batch_factor", self.batch_factor, "a number > 1")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if not self.precisions or bad:
            raise ConfigError(key + "precisions", list(self.precisions), f"a non-empty list of {', '.join(PRECISIONS)}")
        if self.lr_rule not in LR_RULES:
            raise ConfigError(key + "lr_rule", self.lr_rule, f"one of {', '.join(LR_RULES)}")
        if self.reward_form is not None and self.reward_form not in REWARD_FORMS:
            raise ConfigError(key + "reward_form", self.reward_form, f"one of {', '.join(REWARD_FORMS)}")
        if self.lam < 0:
            raise ConfigError(key + "lam", self.lam, "a number >= 0")
        for name, lo, hi in (("alpha", 0.0, 1.0), ("gamma", 0.0, 0.999999), ("eps_start", 0.0, 1.0),
                             ("eps_end", 0.0, self.eps_start), ("utilisation_threshold", 0.0, 1.0)):
            value = getattr(self, name)
            if not lo <= value <= hi or (name == "alpha" and value == 0):
                raise ConfigError(key + name, value, f"a number in {'(' if name == 'alpha' else '['}{lo}, {hi:g}]")
        if self.hysteresis < 0:
            raise ConfigError(key + "hysteresis", self.hysteresis, "a number >= 0")
        for action in self.forced_actions:
            if action not in ACTIONS:
                raise ConfigError(key + "forced_actions", action, f"actions among {', '.join(ACTIONS)}")
        try:
            bins = StateBins.from_dict(dict(self.bins))
        except ConfigError as exc:
            raise ConfigError(key + exc.key, exc.value, exc.allowed) from None
        if self.advisor not in ADVISOR_MODES:
            raise ConfigError(key + "advisor", self.advisor, f"one of {', '.join(ADVISOR_MODES)}")
        if self.advisor == "trace" and not self.advisor_trace:
            raise ConfigError(key + "advisor_trace", self.advisor_trace, "a trace folder: advisor=trace predicts "
                              "from it alone (e.g. benchmarks/results/scheduler_profile)")
        if self.advisor == "trace" and not bins.advice:
            raise ConfigError(key + "advisor", self.advisor, "auto or off: the state has no advice component "
                              "(bins.advice is false)")
        if self.advisor_trace is not None:
            check_trace_folder(self.advisor_trace, key + "advisor_trace")

    def limits(self, start_batch: int) -> Limits:
        return Limits(min_batch=self.min_batch, max_batch=self.max_batch or max(start_batch * 64, 1024),
                      batch_factor=self.batch_factor, precisions=tuple(self.precisions),
                      min_workers=self.min_workers, max_workers=self.max_workers)


@dataclass
class ProfileOptions:
    description: ClassVar[str] = "step time, sync time and gradient statistics per setting, into a trace folder"
    batch_sizes: List[int] = field(default_factory=lambda: [8, 16, 32])
    precisions: List[str] = field(default_factory=lambda: ["32-true", "bf16-mixed"])
    workers: List[int] = field(default_factory=lambda: [1, 2])
    steps: int = 5                  # timed steps per setting (after one warm-up step)
    validation_batches: List[int] = field(default_factory=lambda: [8, 32])
    validation_samples: int = 512   # training samples of each validation run
    validation_every: int = 64      # samples between two rows of a validation run
    val_batches: int = 4            # validation batches per row (eval_batch_size each)

    def __post_init__(self):
        integers_at_least(self, "options", ("steps", "validation_samples", "validation_every", "val_batches"))
        for key in ("batch_sizes", "workers", "validation_batches"):
            if not getattr(self, key) or min(getattr(self, key)) < 1:
                raise ConfigError(f"options.{key}", getattr(self, key), "a non-empty list of integers >= 1")
        bad = [p for p in self.precisions if p not in ("32-true", "bf16-mixed", "16-mixed")]
        if bad or not self.precisions:
            raise ConfigError("options.precisions", self.precisions, "a list of 32-true, bf16-mixed, 16-mixed")
