"""The scheduling agent shared by the simulator and the online plugin.

A job is described by a :class:`Setting` (per-worker batch size, precision, worker count) and
observed through :class:`Signals` (what a monitor reports). :func:`encode_state` turns both into
one discrete state; the state only uses *relative* positions of the setting inside its
:class:`Limits` (e.g. "batch at its minimum", "workers at their maximum"), so a Q-table learned
in the simulator on GPU-sized limits has the same shape and meaning on a 2-process CPU run.

:class:`QLearner` is plain tabular Q-learning (Watkins) with ε-greedy exploration that decays
linearly from ``eps_start`` to ``eps_end`` over ``eps_decay_decisions`` choices. Greedy
choices keep the current setting unless another action beats ``keep`` by ``hysteresis``
relative to |Q(keep)| (Pollux/AdaptDL needed such a margin after batch sizes oscillated).

:func:`reward` is training progress per unit of cost ``J = worker·s + λ·s``: a restart is
charged as cost without progress, an out-of-memory step or a divergence is a fixed penalty.
"""
from __future__ import annotations

import json
import math
import os
from bisect import bisect_right
from dataclasses import asdict, dataclass, fields
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from dsframe.errors import CheckpointError, ConfigError
from dsframe.io import atomic_write

__all__ = [
    "ACTIONS", "PRECISIONS", "FULL_PRECISION", "POLICY_FORMAT",
    "Signals", "Setting", "Limits", "StateBins", "StateView",
    "encode_state", "decode_state", "n_states", "allowed_actions", "next_setting",
    "QLearner", "reward", "REWARD_FORMS", "conservative_heuristic", "follow_advice", "action_index",
]

ACTIONS = ("keep", "batch_up", "batch_down", "precision_low", "precision_full",
           "workers_up", "workers_down")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
FULL_PRECISION = "32-true"
POLICY_FORMAT = "dsframe-scheduler-qtable"
POLICY_VERSION = 2       # 2: the advice state component and the reward form


def action_index(name: str) -> int:
    if name not in ACTIONS:
        raise ConfigError("action", name, f"one of {', '.join(ACTIONS)}")
    return ACTIONS.index(name)


@dataclass
class Signals:
    """One monitor reading."""
    utilisation: float        # 0..1 device utilisation (GPU via NVML, else this process's CPU)
    free_memory: float        # 0..1 fraction of device memory free
    comm_latency_ms: float    # timed small all-reduce; 0 on one process
    noise_scale: float        # gradient noise scale B_noise in samples (Pollux); <= 0: unknown
    advice: int = 0           # index in ACTIONS: a goodput model's next move (Pollux); 0 = keep/none


@dataclass
class Setting:
    """The job's configuration. ``batch_size`` is per worker; the global batch is ×workers."""
    batch_size: int
    precision: str = FULL_PRECISION
    workers: int = 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        if int(self.batch_size) < 1:
            raise ConfigError("batch_size", self.batch_size, "an integer >= 1")
        if int(self.workers) < 1:
            raise ConfigError("workers", self.workers, "an integer >= 1")
        self.batch_size, self.workers = int(self.batch_size), int(self.workers)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers

    @property
    def low_precision(self) -> bool:
        return self.precision != FULL_PRECISION


@dataclass
class Limits:
    """Guard rails: what the actions may reach. A batch action multiplies/divides by ``batch_factor``;
    a worker action doubles/halves the worker count (clipped to the limits)."""
    min_batch: int = 1
    max_batch: int = 64
    batch_factor: float = 2.0
    precisions: tuple = (FULL_PRECISION, "bf16-mixed")
    min_workers: int = 1
    max_workers: int = 1

    def __post_init__(self):
        self.precisions = tuple(self.precisions)
        if int(self.min_batch) < 1:
            raise ConfigError("min_batch", self.min_batch, "an integer >= 1")
        if int(self.max_batch) < int(self.min_batch):
            raise ConfigError("max_batch", self.max_batch, f"an integer >= min_batch ({self.min_batch})")
        if not float(self.batch_factor) > 1.0:
            raise ConfigError("batch_factor", self.batch_factor, "a number > 1")
        if int(self.min_workers) < 1:
            raise ConfigError("min_workers", self.min_workers, "an integer >= 1")
        if int(self.max_workers) < int(self.min_workers):
            raise ConfigError("max_workers", self.max_workers,
                              f"an integer >= min_workers ({self.min_workers})")
        if not self.precisions or any(p not in PRECISIONS for p in self.precisions):
            raise ConfigError("precisions", list(self.precisions),
                              f"a non-empty list of {', '.join(PRECISIONS)}")
        self.min_batch, self.max_batch = int(self.min_batch), int(self.max_batch)
        self.min_workers, self.max_workers = int(self.min_workers), int(self.max_workers)

    def contains(self, s: Setting) -> bool:
        return (self.min_batch <= s.batch_size <= self.max_batch
                and self.min_workers <= s.workers <= self.max_workers and s.precision in self.precisions)


def _edges(name: str, edges) -> tuple:
    edges = tuple(float(e) for e in edges)
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"bins.{name}", list(edges), "strictly increasing bin edges")
    return edges


@dataclass
class StateBins:
    """Bin edges of each signal; a value v falls in bucket ``bisect_right(edges, v)``.

    ``noise_ratio`` bins B_noise / global batch (the batch size's statistical efficiency is
    1 / (1 + B/B_noise) relative to a tiny batch, so the ratio is what matters). Batch size
    is bucketed by its log-position between min_batch and max_batch into ``batch_buckets``
    buckets (the first = at the minimum, the last = at the maximum); workers likewise into
    ``worker_buckets`` buckets.
    """
    utilisation: tuple = (0.4, 0.7)
    free_memory: tuple = (0.1, 0.3)
    comm_latency_ms: tuple = (1.0, 10.0)
    noise_ratio: tuple = (0.25, 1.0, 4.0)
    batch_buckets: int = 8           # one per level of a ×2 ladder up to 128× the minimum
    worker_buckets: int = 5          # 1, 2, 4, 8, 16 workers each their own bucket
    advice: bool = True              # the goodput advisor's next move is part of the state

    def __post_init__(self):
        for f in ("utilisation", "free_memory", "comm_latency_ms", "noise_ratio"):
            setattr(self, f, _edges(f, getattr(self, f)))
        if not isinstance(self.advice, bool):
            raise ConfigError("bins.advice", self.advice, "true or false")
        for f in ("batch_buckets", "worker_buckets"):
            if int(getattr(self, f)) < 1:
                raise ConfigError(f"bins.{f}", getattr(self, f), "an integer >= 1")
            setattr(self, f, int(getattr(self, f)))

    @property
    def sizes(self) -> tuple:
        """Number of buckets per component, in StateView order."""
        key = (self.utilisation, self.free_memory, self.comm_latency_ms, self.noise_ratio,
               self.batch_buckets, self.worker_buckets, self.advice)
        if getattr(self, "_sizes_key", None) != key:        # encode_state asks on every decision
            self._sizes_key = key
            self._sizes = (len(self.utilisation) + 1, len(self.free_memory) + 1, len(self.comm_latency_ms) + 1,
                           len(self.noise_ratio) + 1, self.batch_buckets, 2, self.worker_buckets,
                           len(ACTIONS) if self.advice else 1)
        return self._sizes

    def to_dict(self) -> dict:
        return {f.name: list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple)
                else getattr(self, f.name) for f in fields(self)}

    @classmethod
    def without_advice_key(cls, d: dict) -> dict:
        """Bins of a version-1 policy file (written before the advice feature): no advice."""
        return {**d, "advice": False} if "advice" not in d else d

    @classmethod
    def from_dict(cls, d: dict) -> "StateBins":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError("bins", sorted(unknown), f"keys among {', '.join(sorted(known))}")
        return cls(**d)


class StateView(NamedTuple):
    """The bucket index of each component of a discrete state."""
    utilisation: int
    free_memory: int
    comm_latency: int
    noise: int
    batch: int
    precision: int      # 0 = full (32-true), 1 = reduced (bf16/16-mixed)
    workers: int
    advice: int = 0     # index in ACTIONS (0 where bins.advice is off)


def n_states(bins: StateBins, limits: Optional[Limits] = None) -> int:
    """Size of the state space. It does not depend on ``limits`` (positions are relative), so a
    table learned under one set of limits has the same shape under another."""
    return int(np.prod(bins.sizes))


def _position(value: int, lo: int, hi: int, buckets: int) -> int:
    """Log-position of value in [lo, hi] as a bucket: 0 only at lo, buckets-1 only at hi.
    With lo == hi there is no room to grow: the value counts as at its maximum (so a rule that
    scales workers up first turns to the batch when the worker count is fixed)."""
    if buckets == 1:
        return 0
    if hi <= lo:
        return buckets - 1
    if value <= lo:
        return 0
    if value >= hi:
        return buckets - 1
    if buckets == 2:
        return 1
    frac = math.log(value / lo) / math.log(hi / lo)      # strictly inside (0, 1)
    return 1 + min(int(frac * (buckets - 2)), buckets - 3)


_n_states = n_states  # QLearner's argument of the same name shadows it


def encode_state(signals: Signals, setting: Setting, bins: StateBins, limits: Limits) -> int:
    """One integer in [0, n_states(bins)) for a reading of the signals under a setting."""
    ratio = signals.noise_scale / setting.global_batch if signals.noise_scale > 0 else 1.0
    view = StateView(
        bisect_right(bins.utilisation, float(signals.utilisation)),
        bisect_right(bins.free_memory, float(signals.free_memory)),
        bisect_right(bins.comm_latency_ms, float(signals.comm_latency_ms)),
        bisect_right(bins.noise_ratio, ratio),
        _position(setting.batch_size, limits.min_batch, limits.max_batch, bins.batch_buckets),
        int(setting.low_precision),
        _position(setting.workers, limits.min_workers, limits.max_workers, bins.worker_buckets),
        int(signals.advice) if bins.advice else 0,
    )
    index = 0
    for i, n in zip(view, bins.sizes):      # row-major, as np.ravel_multi_index (faster on scalars)
        index = index * n + i
    return index


def decode_state(index: int, bins: StateBins) -> StateView:
    return StateView(*(int(i) for i in np.unravel_index(int(index), bins.sizes)))


def next_setting(setting: Setting, action: int | str, limits: Limits) -> Setting:
    """The setting an action leads to (unchanged where the limits forbid the move)."""
    name = ACTIONS[action] if isinstance(action, (int, np.integer)) else action
    b, p, w = setting.batch_size, setting.precision, setting.workers
    if name == "batch_up":
        b = min(max(int(round(b * limits.batch_factor)), b + 1), limits.max_batch)
    elif name == "batch_down":
        b = max(min(int(round(b / limits.batch_factor)), b - 1), limits.min_batch)
    elif name == "precision_low":
        low = [q for q in limits.precisions if q != FULL_PRECISION]
        p = low[0] if low and p == FULL_PRECISION else p
    elif name == "precision_full":
        p = FULL_PRECISION if FULL_PRECISION in limits.precisions else p
    elif name == "workers_up":
        w = min(w * 2, limits.max_workers)
    elif name == "workers_down":
        w = max(w // 2, limits.min_workers)
    elif name != "keep":
        action_index(name)  # raises the one-line error
    return Setting(b, p, w)


def allowed_actions(setting: Setting, limits: Limits) -> tuple:
    """Mask over ACTIONS: ``keep`` always, every other action only if it changes the setting."""
    return tuple(a == "keep" or next_setting(setting, a, limits) != setting for a in ACTIONS)


REWARD_FORMS = ("rate", "cost")


def reward(samples_progress: float, worker_seconds: float, seconds: float, lam: float,
           restart_seconds: float = 0.0, oom: bool = False, diverged: bool = False, *,
           restart_workers: float = 1.0, scale: float = 1.0, penalty: float = 1.0,
           form: str = "rate") -> float:
    """Training progress per unit of cost J = worker·s + λ·s, relative to ``scale``.

    ``samples_progress`` is the progress made (samples, or goodput-weighted samples);
    ``worker_seconds``/``seconds`` the cost of the interval. A restart costs
    ``restart_seconds·(restart_workers + λ)`` without progress. ``scale`` is a reference
    progress per unit of cost (e.g. the starting setting's), so rewards are near ±1 and
    ``penalty`` — subtracted for an out-of-memory step or a divergence — is comparable
    across workloads.

    ``form="rate"``: (progress / cost) / scale — higher is better; a restart can lower it
    by at most the interval's whole reward, however long the restart.
    ``form="cost"``: −(cost / progress) · scale — the negated cost per unit of progress
    (−1 at the reference); summed over intervals of equal progress it is exactly −J up to a
    constant factor, so a restart is charged in full (what the benchmark trains with).
    """
    if form not in REWARD_FORMS:
        raise ConfigError("reward_form", form, f"one of {', '.join(REWARD_FORMS)}")
    cost = worker_seconds + lam * seconds + restart_seconds * (restart_workers + lam)
    if form == "rate":
        if oom or diverged:
            return -float(penalty)
        return float(samples_progress) / cost / float(scale) if cost > 0 else 0.0
    if samples_progress <= 0:
        return -float(penalty) - (cost * float(scale) if cost > 0 else 0.0)
    return -cost / float(samples_progress) * float(scale) - (float(penalty) if oom or diverged else 0.0)


def conservative_heuristic(bins: StateBins, threshold: float = 0.7) -> Callable[[StateView], int]:
    """The article's conservative start: utilisation above ``threshold`` → scale up (another
    worker, or a larger batch when workers are at their maximum); almost no free memory →
    smaller batch; otherwise keep."""
    high = bisect_right(bins.utilisation, threshold)   # first bucket whose values exceed threshold
    max_batch, max_workers = bins.batch_buckets - 1, bins.worker_buckets - 1

    def act(v: StateView) -> int:
        if v.free_memory == 0 and v.batch > 0:
            return ACTIONS.index("batch_down")
        if v.utilisation >= high and len(bins.utilisation) > 0:
            if v.workers < max_workers:
                return ACTIONS.index("workers_up")
            if v.batch < max_batch and v.free_memory > 0:
                return ACTIONS.index("batch_up")
        return ACTIONS.index("keep")

    return act


def follow_advice(bins: StateBins) -> Callable[[StateView], int]:
    """Imitation of the goodput advisor (the state's advice component): its action, else keep."""
    return lambda v: int(v.advice) if bins.advice else ACTIONS.index("keep")


@dataclass
class _Hyper:
    alpha: float = 0.1
    gamma: float = 0.9
    eps_start: float = 0.3
    eps_end: float = 0.05
    eps_decay_decisions: int = 500
    hysteresis: float = 0.0


class QLearner:
    """Tabular Q-learning over ``n_states`` × ``n_actions`` (numpy)."""

    def __init__(self, n_states: int, n_actions: int = len(ACTIONS), alpha: float = 0.1,
                 gamma: float = 0.9, eps_start: float = 0.3, eps_end: float = 0.05,
                 eps_decay_decisions: int = 500, seed: int = 0, hysteresis: float = 0.0,
                 bins: Optional[StateBins] = None):
        checks = [("alpha", alpha, 0 < alpha <= 1, "a number in (0, 1]"),
                  ("gamma", gamma, 0 <= gamma < 1, "a number in [0, 1)"),
                  ("eps_start", eps_start, 0 <= eps_start <= 1, "a number in [0, 1]"),
                  ("eps_end", eps_end, 0 <= eps_end <= eps_start, f"a number in [0, eps_start={eps_start}]"),
                  ("eps_decay_decisions", eps_decay_decisions, int(eps_decay_decisions) >= 1, "an integer >= 1"),
                  ("hysteresis", hysteresis, hysteresis >= 0, "a number >= 0"),
                  ("n_states", n_states, int(n_states) >= 1, "an integer >= 1"),
                  ("n_actions", n_actions, int(n_actions) >= 1, "an integer >= 1")]
        for key, value, ok, allowed in checks:
            if not ok:
                raise ConfigError(key, value, allowed)
        if bins is not None and n_states != _n_states(bins):
            raise ConfigError("n_states", n_states, f"{_n_states(bins)} for these bins")
        self.hyper = _Hyper(float(alpha), float(gamma), float(eps_start), float(eps_end),
                            int(eps_decay_decisions), float(hysteresis))
        self.q = np.zeros((int(n_states), int(n_actions)), dtype=np.float64)
        self.visits = np.zeros((int(n_states), int(n_actions)), dtype=np.int64)
        self.decisions = 0
        self.updates = 0
        self.bins = bins
        self.reward_form: Optional[str] = None    # what the table was trained on (policy file)
        self.seed = int(seed)
        self._rng = np.random.default_rng(seed)

    # -- hyper-parameters as attributes (read-only views)
    alpha = property(lambda self: self.hyper.alpha)
    gamma = property(lambda self: self.hyper.gamma)

    @property
    def n_states(self) -> int:
        return self.q.shape[0]

    @property
    def n_actions(self) -> int:
        return self.q.shape[1]

    @property
    def epsilon(self) -> float:
        """Linear decay from eps_start to eps_end over eps_decay_decisions choices, then flat."""
        h = self.hyper
        frac = min(1.0, self.decisions / h.eps_decay_decisions)
        return h.eps_start + (h.eps_end - h.eps_start) * frac

    def _mask(self, allowed: Optional[Sequence[bool]]) -> np.ndarray:
        if allowed is None:
            return np.ones(self.n_actions, dtype=bool)
        if isinstance(allowed, np.ndarray) and allowed.dtype == bool and allowed.shape == (self.n_actions,) \
                and allowed.any():
            return allowed
        mask = np.asarray(allowed, dtype=bool)
        if mask.shape != (self.n_actions,):
            raise ConfigError("allowed", list(allowed), f"{self.n_actions} booleans")
        if not mask.any():
            raise ConfigError("allowed", list(allowed), "at least one allowed action")
        return mask

    def greedy(self, state: int, allowed: Optional[Sequence[bool]] = None) -> int:
        """Best allowed action; ties go to the lowest index (``keep`` first); another action
        replaces ``keep`` only if its value exceeds keep's by more than ``hysteresis``·|Q(keep)|
        (relative, so it means the same at any reward scale)."""
        mask = self._mask(allowed)
        qs = np.where(mask, self.q[state], -np.inf)
        best = int(np.argmax(qs))
        if mask[0] and best != 0 and qs[best] <= qs[0] + self.hyper.hysteresis * abs(qs[0]):
            return 0
        return best

    def choose(self, state: int, allowed: Optional[Sequence[bool]] = None, explore: bool = True) -> int:
        """ε-greedy among allowed actions; counts a decision (which decays ε) when exploring."""
        mask = self._mask(allowed)
        if explore:
            eps = self.epsilon
            self.decisions += 1
            if self._rng.random() < eps:
                return int(self._rng.choice(np.flatnonzero(mask)))
        return self.greedy(state, mask)

    def update(self, s: int, a: int, reward: float, s_next: Optional[int],
               allowed_next: Optional[Sequence[bool]] = None, done: bool = False,
               discount: Optional[float] = None) -> float:
        """Q(s,a) += α·(r + γ·max_{a' allowed} Q(s',a') − Q(s,a)); returns the TD error.
        ``done`` (or ``s_next=None``) ends the episode: the target is r alone. ``discount``
        replaces γ for this transition (1 for a move that takes no time, as in a semi-MDP)."""
        if done or s_next is None:
            target = float(reward)
        else:
            mask = self._mask(allowed_next)
            g = self.hyper.gamma if discount is None else float(discount)
            target = float(reward) + g * float(self.q[s_next][mask].max())
        td = target - self.q[s, a]
        self.q[s, a] += self.hyper.alpha * td
        self.visits[s, a] += 1
        self.updates += 1
        return float(td)

    def warm_start(self, heuristic: Callable[[StateView], int] | Callable[[int], int],
                   value: float = 1.0, bins: Optional[StateBins] = None, base: float = 0.0) -> None:
        """Imitation start (DL2 needed one): Q[s, a] = base everywhere, + value for the
        heuristic's action. ``base`` should be a typical value (e.g. reward/(1−γ) of the
        start setting) so untried actions look neither better nor worse than known ones.
        The heuristic takes a StateView when bins are known (given or self.bins), else the index."""
        bins = bins or self.bins
        self.q[:] = float(base)
        for s in range(self.n_states):
            a = heuristic(decode_state(s, bins)) if bins is not None else heuristic(s)
            self.q[s, int(a)] = float(base) + float(value)

    # -- persistence: Lightning checkpoint (plain Python types) and policy file (JSON)
    def state_dict(self) -> dict:
        return {
            "format": POLICY_FORMAT, "version": POLICY_VERSION, "actions": list(ACTIONS),
            "n_states": self.n_states, "n_actions": self.n_actions,
            "hyper": asdict(self.hyper), "q": self.q.tolist(), "visits": self.visits.tolist(),
            "decisions": int(self.decisions), "updates": int(self.updates), "seed": self.seed,
            "bins": self.bins.to_dict() if self.bins is not None else None,
            "reward_form": self.reward_form,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, d: dict, source: str = "state dict") -> None:
        try:
            if d.get("format") != POLICY_FORMAT:
                raise CheckpointError(f"{source}: not a scheduler Q-table (format={d.get('format')!r}, "
                                      f"expected {POLICY_FORMAT!r})")
            if int(d.get("version", -1)) > POLICY_VERSION:
                raise CheckpointError(f"{source}: Q-table version {d.get('version')} is newer than "
                                      f"this dsframe reads ({POLICY_VERSION})")
            if tuple(d["actions"]) != ACTIONS[: len(d["actions"])] or len(d["actions"]) != self.n_actions:
                raise CheckpointError(f"{source}: actions {d['actions']} do not match {list(ACTIONS)}")
            q = np.asarray(d["q"], dtype=np.float64)
            if q.shape != self.q.shape:
                raise CheckpointError(f"{source}: Q-table of shape {list(q.shape)} does not match the "
                                      f"scheduler's state space {list(self.q.shape)} (different bins?)")
            if not np.isfinite(q).all():
                raise CheckpointError(f"{source}: Q-table holds non-finite values")
            bins = StateBins.from_dict(StateBins.without_advice_key(d["bins"])) if d.get("bins") is not None else None
            if bins is not None and self.bins is not None and bins.to_dict() != self.bins.to_dict():
                raise CheckpointError(f"{source}: Q-table bins {bins.to_dict()} differ from the "
                                      f"scheduler's {self.bins.to_dict()}")
            visits = d.get("visits")
            if isinstance(visits, dict):                       # the policy file's sparse form
                flat = np.zeros(q.size, dtype=np.int64)
                for i, n in visits["sparse"]:
                    flat[int(i)] = int(n)
                visits = flat.reshape(q.shape)
            visits = np.asarray(np.zeros_like(q) if visits is None else visits, dtype=np.int64)
            if visits.shape != q.shape:
                raise CheckpointError(f"{source}: visit counts of shape {list(visits.shape)} do not "
                                      f"match the Q-table {list(q.shape)}")
            hyper = _Hyper(**d["hyper"]) if "hyper" in d else self.hyper
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise CheckpointError(f"{source}: damaged scheduler Q-table ({type(e).__name__}: {e})") from None
        self.q, self.visits, self.hyper = q, visits, hyper
        self.decisions, self.updates = int(d.get("decisions", 0)), int(d.get("updates", 0))
        self.bins = bins if bins is not None else self.bins
        form = d.get("reward_form")
        if form is not None and form not in REWARD_FORMS:
            raise CheckpointError(f"{source}: reward_form {form!r} is not one of {', '.join(REWARD_FORMS)}")
        self.reward_form = form
        if d.get("rng") is not None:
            self._rng.bit_generator.state = d["rng"]

    def save(self, path: str | os.PathLike, meta: Optional[dict] = None) -> None:
        """Write the policy file (JSON, atomically). ``meta`` (e.g. where it was trained) is kept."""
        d = self.state_dict()
        d["q"] = [[float(f"{x:.6g}") for x in row] for row in d["q"]]   # 6 digits: a third of the size
        nz = np.flatnonzero(self.visits)
        d["visits"] = {"sparse": [[int(i), int(self.visits.flat[i])] for i in nz]}   # mostly zeros
        d["meta"] = meta or {}

        def _write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(d, f, separators=(",", ":"))      # compact: ~60k numbers at the defaults
                f.write("\n")

        atomic_write(path, _write)

    @classmethod
    def load(cls, path: str | os.PathLike, bins: Optional[StateBins] = None) -> "QLearner":
        """Read a policy file; ``bins`` (if given) must match the file's. CheckpointError if the
        file is missing, not JSON, damaged or of another state space."""
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"scheduler policy file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"scheduler policy file {path} is not readable JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"scheduler policy file {path}: not a scheduler Q-table")
        try:
            shape = (int(d["n_states"]), int(d["n_actions"]))
            file_bins = StateBins.from_dict(StateBins.without_advice_key(d["bins"])) if d.get("bins") is not None else None
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise CheckpointError(f"scheduler policy file {path}: damaged ({type(e).__name__}: {e})") from None
        if d.get("format") != POLICY_FORMAT:
            raise CheckpointError(f"scheduler policy file {path}: not a scheduler Q-table "
                                  f"(format={d.get('format')!r})")
        if bins is not None and shape[0] != n_states(bins):
            raise CheckpointError(f"scheduler policy file {path}: {shape[0]} states, but the "
                                  f"configured bins give {n_states(bins)}")
        if shape[0] < 1 or shape[1] < 1:
            raise CheckpointError(f"scheduler policy file {path}: empty Q-table shape {list(shape)}")
        try:
            learner = cls(shape[0], shape[1], bins=bins or file_bins)
        except ConfigError as e:
            raise CheckpointError(f"scheduler policy file {path}: does not fit its bins ({e})") from None
        learner.load_state_dict(d, source=f"scheduler policy file {path}")
        learner.meta = d.get("meta", {})
        return learner
