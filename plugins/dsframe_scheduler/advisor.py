"""The goodput advisor of a running job: the state's ``advice`` component online.

The simulator's :class:`~dsframe_scheduler.policies.GoodputAdvisor` predicts every setting's
step time from the workload fitted on a trace. A running job has to predict settings it has not
tried; :class:`StepTimeModel` does it from

* a **trace** (``plugins.scheduler.advisor_trace``, a folder in the AdaptDL layout such as this
  machine's ``benchmarks/results/scheduler_profile``): the simulator's fitted step-time form
  (:class:`~dsframe_scheduler.simulator.Workload`: compute ``α_c + β_c·b (+κ·b·(r−1))`` per
  precision, sync, overlap), evaluated at the job's settings; and/or
* the step times **the job measures** at the settings it visits (median seconds per step, rank
  0, the first step after a change or a decision left out): a visited setting is predicted by
  its measurement; an untried batch size at a visited (precision, workers) by the same fitted
  form — affine in the local batch, ``a + c·b``, fitted (non-negative least squares) on the
  visited batch sizes there once there are two; otherwise the trace's prediction scaled by
  the measured/predicted ratio of the visited settings (same precision and workers first, then
  same precision, then all). A setting neither can predict is not a candidate.

``mode="trace"`` uses the trace alone, exactly as the simulator does; ``mode="auto"`` adds the
measurements (and works without a trace, among the settings its measurements reach).
:class:`OnlineAdvisor` couples the model with a ``GoodputAdvisor`` for the plugin.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dsframe.errors import ConfigError, DsframeError
from dsframe_scheduler.agent import Limits, Setting, next_setting

__all__ = ["StepTimeModel", "OnlineAdvisor", "check_trace_folder", "load_trace_workload", "ADVISOR_MODES"]

ADVISOR_MODES = ("auto", "off", "trace")
DEFAULT_RESTART_SECONDS = 5.0      # a segment switch before one was measured (and without a trace)


def check_trace_folder(folder, key: str = "plugins.scheduler.advisor_trace") -> Path:
    """``folder`` as a Path if it holds a trace's placements.csv, else a one-line ConfigError."""
    path = Path(str(folder))
    if not (path / "placements.csv").is_file():
        raise ConfigError(key, folder, "a trace folder with placements.csv and validation-<B>.csv "
                          "(e.g. benchmarks/results/scheduler_profile), or null")
    return path


def load_trace_workload(folder, key: str = "plugins.scheduler.advisor_trace"):
    """The simulator's :class:`Workload` of a trace folder (all rows in the fit); a bad folder
    is a one-line :class:`ConfigError` naming ``key``."""
    from dsframe_scheduler.simulator import Workload, read_trace

    path = check_trace_folder(folder, key)
    try:
        return Workload(read_trace(path), holdout_every=0)
    except DsframeError as exc:
        raise ConfigError(key, str(folder), f"a readable trace folder ({exc})") from None


def _key(s: Setting) -> tuple:
    return (s.batch_size, s.precision, s.workers)


class StepTimeModel:
    """Seconds per step of any setting inside ``limits``, from a trace ``prior`` and/or measured
    step times (see the module). Duck-types the step-time model ``GoodputAdvisor`` works on."""

    def __init__(self, limits: Limits, init_batch: int, prior=None, mode: str = "auto",
                 restart_seconds: Optional[float] = None, fits: Optional[Callable[[Setting], bool]] = None,
                 min_samples: int = 2, keep: int = 32):
        if mode not in ("auto", "trace"):
            raise ConfigError("mode", mode, "auto or trace")
        if mode == "trace" and prior is None:
            raise ConfigError("prior", None, "a trace workload (mode trace)")
        self.limits, self.init_batch, self.prior, self.mode = limits, int(init_batch), prior, mode
        self._fits = fits
        self.min_samples, self.keep = int(min_samples), int(keep)
        self.samples: dict = {}            # (batch, precision, workers) -> recent seconds per step
        self.restarts: list = []           # measured segment switches (seconds)
        self._restart_default = (restart_seconds if restart_seconds is not None else
                                 prior.restart_seconds if prior is not None else DEFAULT_RESTART_SECONDS)
        self.current: Optional[Setting] = None   # the ladders of candidates run through it
        self._cache: dict = {}

    # -- what the job measures
    def observe(self, s: Setting, seconds: float) -> None:
        if not (seconds > 0 and np.isfinite(seconds)):
            return
        xs = self.samples.setdefault(_key(s), [])
        xs.append(float(seconds))
        del xs[:-self.keep]
        self._cache.clear()

    def observe_restart(self, seconds: float) -> None:
        if seconds > 0 and np.isfinite(seconds):
            self.restarts.append(float(seconds))
            del self.restarts[:-self.keep]

    @property
    def restart_seconds(self) -> float:
        """Median measured segment switch; before one, the trace's ``restart_seconds`` (or 5 s)."""
        if self.mode == "auto" and self.restarts:
            return float(statistics.median(self.restarts))
        return float(self._restart_default)

    def measured(self) -> dict:
        """(batch, precision, workers) -> median seconds per step, settings with enough samples."""
        if self.mode != "auto":
            return {}
        return {k: float(statistics.median(v)) for k, v in self.samples.items() if len(v) >= self.min_samples}

    # -- predictions
    def _prior(self, s: Setting) -> float:
        if self.prior is None or s.precision not in self.prior.precision:
            return float("nan")
        return float(self.prior.step_time(s))

    def step_time(self, s: Setting) -> float:
        key = _key(s)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = self._predict(s)
        return t

    def _predict(self, s: Setting) -> float:
        if self.mode == "trace":
            return self._prior(s)
        meas = self.measured()
        key = _key(s)
        if key in meas:
            return meas[key]
        same = {k[0]: t for k, t in meas.items() if k[1:] == key[1:]}
        if len(same) >= 2:                               # the affine form in b, fitted on the visited batches
            from dsframe_scheduler.simulator import _nnls

            b = np.array(sorted(same), dtype=float)
            a, c = _nnls(np.stack([np.ones_like(b), b], 1), np.array([same[x] for x in sorted(same)]))
            t = float(a + c * s.batch_size)
            return t if t > 0 else float("nan")
        base = self._prior(s)
        if not np.isfinite(base):
            return float("nan")
        for level in (lambda k: k[1:] == key[1:], lambda k: k[1] == key[1], lambda k: True):
            ratios = [t / p for k, t in meas.items() if level(k)
                      for p in [self._prior(Setting(*k))] if np.isfinite(p) and p > 0]
            if ratios:
                return float(np.median(ratios)) * base
        return base

    # -- the rest of the advisor's interface
    def settings(self) -> list:
        """The settings reachable from :attr:`current` along the ladders (batch × / ÷ the factor,
        workers × / ÷ 2, every allowed precision) that fit."""
        cur = self.current
        if cur is None:
            return []
        batches, workers = self._ladder(cur, "batch_up", "batch_down", 0), \
            self._ladder(cur, "workers_up", "workers_down", 2)
        out = [Setting(b, p, w) for b in batches for p in self.limits.precisions for w in workers]
        return [s for s in out if self.fits(s)]

    def _ladder(self, cur: Setting, up: str, down: str, field: int) -> list:
        values = {_key(cur)[field]}
        for move in (up, down):
            s = cur
            while True:
                nxt = next_setting(s, move, self.limits)
                if nxt == s:
                    break
                values.add(_key(nxt)[field])
                s = nxt
        return sorted(values)

    def fits(self, s: Setting) -> bool:
        return self.limits.contains(s) and (self._fits is None or self._fits(s))

    @staticmethod
    def needs_restart(a: Setting, b: Setting) -> bool:
        return a.precision != b.precision or a.workers != b.workers

    # -- checkpoint (plain types)
    def state_dict(self) -> dict:
        return {"samples": [[b, p, w, list(v)] for (b, p, w), v in self.samples.items()],
                "restarts": list(self.restarts)}

    def load_state_dict(self, d: Optional[dict]) -> None:
        if not d:
            return
        self.samples = {(int(b), str(p), int(w)): [float(x) for x in v] for b, p, w, v in d.get("samples", [])}
        self.restarts = [float(x) for x in d.get("restarts", [])]
        self._cache.clear()


class OnlineAdvisor:
    """A :class:`GoodputAdvisor` on a :class:`StepTimeModel`, driven by the plugin: it records
    step times, smooths the noise scale, and gives the advice for a setting at a decision."""

    def __init__(self, model: StepTimeModel, lam: float, min_gain: float = 0.05, smoothing: float = 0.5):
        from dsframe_scheduler.policies import GoodputAdvisor

        self.model = model
        self.advisor = GoodputAdvisor(min_gain=min_gain, smoothing=smoothing)
        self.advisor.start(model, lam)

    def update(self, noise_scale: float) -> None:
        """A new reading of B_noise; ≤ 0 (not measured yet, e.g. after a batch change) is skipped."""
        if noise_scale > 0 and np.isfinite(noise_scale):
            self.advisor.update(noise_scale)

    def advise(self, setting: Setting, remaining: float) -> tuple[int, Setting]:
        """(action index, goal setting) from ``setting`` with ``remaining`` progress (steps at
        ``init_batch``) left."""
        from dsframe_scheduler.agent import allowed_actions

        self.model.current = setting
        self.advisor.refresh(self.model)
        goal = self.advisor.goal(setting, remaining)
        if goal == setting:
            return 0, setting
        return self.advisor.advise(setting, allowed_actions(setting, self.model.limits), remaining, goal), goal

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "b_noise": self.advisor.b_noise}

    def load_state_dict(self, d: Optional[dict]) -> None:
        if not d:
            return
        self.model.load_state_dict(d.get("model"))
        self.advisor.b_noise = d.get("b_noise")

