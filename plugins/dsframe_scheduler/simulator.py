"""A training-job environment calibrated on measured traces (the AdaptDL/Pollux layout).

A trace folder holds (Qiao et al., OSDI 2021, petuum/adaptdl ``simulator/traces/``):

- ``placements.csv``: ``placement,local_bsz,step_time,sync_time`` — seconds per step; the
  placement's digits are workers per node (``22`` = 2 nodes × 2 workers). An optional
  ``precision`` column (``32-true`` | ``bf16-mixed`` | ``16-mixed``, default ``32-true``) holds
  measurements in reduced precision; they set the workload's precision factors.
- ``scalability.csv`` (optional): ``num_nodes,num_replicas,local_bsz,step_time,sync_time``.
- ``validation-<B>.csv``: ``progress,iteration,metric,grad_sqr,grad_var`` — a run at total
  batch size B; ``progress`` counts steps at the smallest B equivalent under AdaScale, the
  gradient statistics give the gradient noise scale B_noise = B0 · grad_var / grad_sqr.
- ``workload.json`` (optional): a :class:`WorkloadSpec` (target metric, restart seconds,
  precision factors, memory model, worker ladder). Without it, defaults apply.

Cost model (per worker, all fitted on the trace with numpy, after Pollux's goodput model):
``compute(b, r) = (α_c + β_c·b + κ·b·(r−1)) · speed(precision)`` (κ: compute contention
between workers sharing a machine; ~0 on GPUs), ``sync(r, nodes) = α + β·max(r−2, 0)``
(intra- or inter-node constants), ``step = (compute^γ + sync^γ)^(1/γ)`` (γ ≥ 1: overlap).
A reduced precision measured at ≥ 2 local batch sizes gets compute constants of its own,
fitted the same way on its rows (on a CPU bf16 has a larger fixed cost and a smaller per-sample
cost than fp32: one speed factor cannot describe both); otherwise its compute time is fp32's
times the workload's speed factor.
Memory is ``base + (0.95 − base)·b·memory(precision)/cap`` of the device, ``cap`` = the largest
measured local batch, so anything above it runs out of memory.
Statistical efficiency (AdaScale gain, as Pollux): a step at global batch B makes
``gain = (var + sqr) / (var/s + sqr)`` units of progress, s = B/B0, with (sqr, var)
interpolated between the measured batch sizes at the current progress.
A job is done when its progress reaches the point where the B0 trace first reaches the
target metric. Cost ``J = Σ workers·seconds + λ·Σ seconds``; changing workers or precision
restarts the job (``restart_seconds`` charged at the new worker count); an out-of-memory step
costs a restart and backs the batch off.
"""
from __future__ import annotations

import csv
import json
import math
import os
from bisect import bisect_right
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from dsframe.errors import ConfigError, DsframeError
from dsframe_scheduler.agent import (
    FULL_PRECISION, PRECISIONS, Limits, Setting, Signals, next_setting,
)

__all__ = ["Trace", "read_trace", "WorkloadSpec", "PerfModel", "StatModel", "Workload",
           "ClusterSim", "ChunkResult", "placement_of", "calibration_error", "TRACES_DIR",
           "bundled_traces"]

TRACES_DIR = Path(__file__).resolve().parent / "traces"


def bundled_traces() -> list[Path]:
    """The trace folders shipped with the package (bert, cifar10, imagenet)."""
    return sorted(p for p in TRACES_DIR.iterdir() if (p / "placements.csv").is_file())


# ----------------------------------------------------------------------------- reading
def _read_csv(path: Path, required: Iterable[str]) -> dict[str, list]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise DsframeError(f"trace file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DsframeError(f"trace file {path} is not readable CSV ({e})") from None
    missing = [c for c in required if not rows or c not in rows[0]]
    if not rows:
        raise DsframeError(f"trace file {path} has no rows")
    if missing:
        raise DsframeError(f"trace file {path} lacks column(s) {', '.join(missing)}; "
                           f"has {', '.join(rows[0])}")
    cols: dict[str, list] = {c: [r[c] for r in rows] for c in rows[0]}
    return cols


def _floats(path: Path, cols: dict, name: str) -> np.ndarray:
    try:
        a = np.asarray([float(v) for v in cols[name]], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DsframeError(f"trace file {path}: column {name} is not numeric ({e})") from None
    if not np.isfinite(a).all():
        raise DsframeError(f"trace file {path}: column {name} holds non-finite values")
    return a


@dataclass
class Trace:
    """The raw measurements of one folder."""
    name: str
    folder: Path
    # placements and scalability rows merged: nodes, replicas, local_bsz, step_time, sync_time
    nodes: np.ndarray
    replicas: np.ndarray
    local_bsz: np.ndarray
    step_time: np.ndarray
    sync_time: np.ndarray
    precision: list            # per row
    placement: list            # per row: placement string ("" for scalability rows)
    validation: dict           # B -> dict of arrays progress, iteration, metric, grad_sqr, grad_var
    spec: dict                 # workload.json (may be empty)


def read_trace(folder: str | os.PathLike) -> Trace:
    """Read any folder in the AdaptDL trace layout; DsframeError names a bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DsframeError(f"trace folder {folder} does not exist")
    p = folder / "placements.csv"
    cols = _read_csv(p, ("placement", "local_bsz", "step_time", "sync_time"))
    placement = [str(v).strip() for v in cols["placement"]]
    if any(not s.isdigit() or "0" in s for s in placement):
        raise DsframeError(f"trace file {p}: placement must be digits 1-9 (workers per node), got "
                           f"{next(s for s in placement if not s.isdigit() or '0' in s)!r}")
    nodes = [len(s) for s in placement]
    replicas = [sum(map(int, s)) for s in placement]
    bsz, step, sync = (_floats(p, cols, c) for c in ("local_bsz", "step_time", "sync_time"))
    precision = [str(v).strip() or FULL_PRECISION for v in cols.get("precision", [FULL_PRECISION] * len(bsz))]
    bad = [q for q in precision if q not in PRECISIONS]
    if bad:
        raise DsframeError(f"trace file {p}: precision {bad[0]!r} is not one of {', '.join(PRECISIONS)}")
    s = folder / "scalability.csv"
    if s.is_file():
        sc = _read_csv(s, ("num_nodes", "num_replicas", "local_bsz", "step_time", "sync_time"))
        nodes += list(_floats(s, sc, "num_nodes").astype(int))
        replicas += list(_floats(s, sc, "num_replicas").astype(int))
        bsz = np.concatenate([bsz, _floats(s, sc, "local_bsz")])
        step = np.concatenate([step, _floats(s, sc, "step_time")])
        sync = np.concatenate([sync, _floats(s, sc, "sync_time")])
        precision += [FULL_PRECISION] * len(sc["local_bsz"])
        placement += [""] * len(sc["local_bsz"])
    if (step <= 0).any() or (bsz < 1).any() or (sync < 0).any():
        raise DsframeError(f"trace folder {folder}: step_time must be > 0, sync_time >= 0, local_bsz >= 1")
    validation = {}
    for v in sorted(folder.glob("validation-*.csv")):
        try:
            b = int(v.stem.split("-")[-1])
        except ValueError:
            raise DsframeError(f"trace file {v}: name must be validation-<batch size>.csv") from None
        vc = _read_csv(v, ("progress", "iteration", "metric", "grad_sqr", "grad_var"))
        validation[b] = {c: _floats(v, vc, c) for c in ("progress", "iteration", "metric", "grad_sqr", "grad_var")}
    if not validation:
        raise DsframeError(f"trace folder {folder} has no validation-<batch size>.csv")
    spec = {}
    w = folder / "workload.json"
    if w.is_file():
        try:
            spec = json.loads(w.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DsframeError(f"trace file {w} is not readable JSON ({e})") from None
    return Trace(folder.name, folder, np.asarray(nodes), np.asarray(replicas), bsz, step, sync,
                 precision, placement, dict(sorted(validation.items())), spec)


# ----------------------------------------------------------------------------- spec
@dataclass
class WorkloadSpec:
    """Per-workload facts the traces do not hold (workload.json overrides any of them)."""
    target_metric: Optional[float] = None      # None: the last progress row common to all runs
    restart_seconds: float = 30.0              # Pollux's simulator charges 30 s per re-allocation
    gpus_per_node: int = 4                     # workers fill nodes of this size
    max_workers: Optional[int] = None          # None: the most workers measured in placements.csv
    static_workers: int = 4                    # the static default's fixed worker count (capped)
    memory_base: float = 0.3                   # device memory used at batch 0 (weights, optimizer)
    memory_cap: Optional[int] = None           # largest local batch that fits (None: largest measured)
    # precision -> {"speed": compute-time multiplier, "memory": activation-memory multiplier, "source": ...}
    precision: dict = field(default_factory=dict)
    decisions: int = 100                       # decision points per job (equal progress chunks)
    step_time_cv: float = 0.05                 # per-chunk step-time noise (lognormal sigma)
    interference_cv: float = 0.3               # per-run network interference (lognormal sigma)
    noise_scale_cv: float = 0.2                # noise of the B_noise estimate per reading
    utilisation_sd: float = 0.03               # noise of the utilisation reading

    def __post_init__(self):
        for k in ("restart_seconds", "memory_base", "step_time_cv", "interference_cv",
                  "noise_scale_cv", "utilisation_sd"):
            if not float(getattr(self, k)) >= 0:
                raise ConfigError(k, getattr(self, k), "a number >= 0")
        if not 0 <= self.memory_base < 0.95:
            raise ConfigError("memory_base", self.memory_base, "a fraction in [0, 0.95)")
        for k in ("gpus_per_node", "max_workers", "static_workers", "decisions"):
            if getattr(self, k) is not None and int(getattr(self, k)) < 1:
                raise ConfigError(k, getattr(self, k), "an integer >= 1")
        for p, f in self.precision.items():
            if p not in PRECISIONS or not isinstance(f, dict) or not {"speed", "memory"} <= set(f):
                raise ConfigError(f"precision.{p}", f, "{speed: x, memory: y[, source: text]} for "
                                  + ", ".join(PRECISIONS))

    @classmethod
    def from_dict(cls, d: dict) -> "WorkloadSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError("workload.json", sorted(unknown), f"keys among {', '.join(sorted(known))}")
        return cls(**d)


# ----------------------------------------------------------------------------- step-time model
def placement_of(workers: int, gpus_per_node: int) -> str:
    """Workers packed onto as few nodes as possible: 8 on nodes of 4 -> '44'."""
    full, rest = divmod(workers, gpus_per_node)
    return str(gpus_per_node) * full + (str(rest) if rest else "")


@dataclass
class PerfModel:
    alpha_c: float
    beta_c: float
    kappa: float
    alpha_r: float
    beta_r: float
    alpha_n: float
    beta_n: float
    gamma: float

    def compute(self, bsz, replicas, speed=1.0):
        return (self.alpha_c + self.beta_c * bsz + self.kappa * bsz * (np.asarray(replicas) - 1)) * speed

    def network(self, nodes, replicas):
        nodes, replicas = np.asarray(nodes), np.asarray(replicas)
        extra = np.maximum(replicas - 2, 0)
        return np.where(nodes > 1, self.alpha_n + self.beta_n * extra,
                        np.where(replicas > 1, self.alpha_r + self.beta_r * extra, 0.0))

    def step(self, bsz, nodes, replicas, speed=1.0, interference=1.0):
        c = self.compute(bsz, replicas, speed)
        n = self.network(nodes, replicas) * interference
        g = self.gamma
        return (c ** g + n ** g) ** (1 / g)

    @classmethod
    def fit(cls, nodes, replicas, bsz, step, sync) -> "PerfModel":
        """Least squares in numpy: compute on step − sync, then (for each γ on a grid) the
        network constants on the sync time the overlap model implies; γ by log-RMSE."""
        nodes, replicas, bsz, step, sync = map(np.asarray, (nodes, replicas, bsz, step, sync))
        accum = np.maximum(step - sync, 1e-6)
        X = np.stack([np.ones_like(bsz), bsz, bsz * (replicas - 1)], axis=1)
        if len(np.unique(replicas)) == 1:
            X = X[:, :2]
        coef = _nnls(X, accum)
        a_c, b_c, kap = coef[0], coef[1], (coef[2] if len(coef) > 2 else 0.0)
        probe = cls(a_c, b_c, kap, 0, 0, 0, 0, 1.0)
        c = probe.compute(bsz, replicas)
        multi = replicas > 1
        best = None
        for g in (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0):
            implied = np.maximum(step ** g - c ** g, 1e-12) ** (1 / g)
            extra = np.maximum(replicas - 2, 0)
            inter, intra = (nodes > 1) & multi, (nodes == 1) & multi
            params = []
            for m in (intra, inter):
                if m.sum() >= 2 and len(np.unique(extra[m])) > 1:
                    params += list(_nnls(np.stack([np.ones(m.sum()), extra[m]], 1), implied[m]))
                elif m.any():
                    params += [float(np.median(implied[m])), 0.0]
                else:
                    params += [None, 0.0]
            a_r, b_r, a_n, b_n = params
            if a_r is None:
                a_r = 0.0 if a_n is None else a_n
            if a_n is None:
                a_n, b_n = a_r, b_r
            model = cls(a_c, b_c, kap, a_r, b_r, a_n, b_n, g)
            err = float(np.sqrt(np.mean(np.log(model.step(bsz, nodes, replicas) / step) ** 2)))
            if best is None or err < best[0]:
                best = (err, model)
        return best[1]


def _nnls(X: np.ndarray, y: np.ndarray, iters: int = 50) -> np.ndarray:
    """Non-negative least squares by active-set clipping (a few columns only)."""
    active = np.ones(X.shape[1], dtype=bool)
    coef = np.zeros(X.shape[1])
    for _ in range(iters):
        sol, *_ = np.linalg.lstsq(X[:, active], y, rcond=None)
        coef[:] = 0.0
        coef[active] = sol
        if (coef >= 0).all():
            return coef
        active &= coef > 0
        if not active.any():
            return np.zeros(X.shape[1])
    return np.maximum(coef, 0.0)


# ----------------------------------------------------------------------------- statistics
class StatModel:
    """Progress, gradient statistics and target from the validation runs."""

    def __init__(self, validation: dict, target_metric: Optional[float]):
        self.batches = np.asarray(sorted(validation), dtype=np.float64)
        self.init_batch = int(self.batches[0])
        rows = min(len(v["progress"]) for v in validation.values())
        self.rows = rows
        self._cache: dict = {}
        self.sqr = np.stack([validation[int(b)]["grad_sqr"][:rows] for b in self.batches])   # [B, rows]
        self.var = np.stack([validation[int(b)]["grad_var"][:rows] for b in self.batches])
        # progress at the end of row e (Pollux: the minimum over the runs)
        self.row_end = np.min(np.stack([validation[int(b)]["progress"][:rows] for b in self.batches]), 0)
        self._row_end = [float(x) for x in self.row_end]          # bisect on a list: fast on scalars
        base = validation[self.init_batch]
        metric = base["metric"][:rows]
        increasing = metric[-1] >= metric[0]
        best = np.maximum.accumulate(metric) if increasing else np.minimum.accumulate(metric)
        if target_metric is None:
            self.target_metric, self.target_progress = float(best[-1]), float(self.row_end[-1])
        else:
            reached = best >= target_metric if increasing else best <= target_metric
            if not reached.any():
                raise ConfigError("target_metric", target_metric,
                                  f"a metric the B={self.init_batch} run reaches (best {best[-1]:.4g})")
            e = int(np.argmax(reached))
            # linear interpolation inside the row where the target is first crossed
            p0, m0 = (0.0, metric[0]) if e == 0 else (self.row_end[e - 1], best[e - 1])
            frac = 1.0 if e == 0 or best[e] == m0 else (target_metric - m0) / (best[e] - m0)
            self.target_metric = float(target_metric)
            self.target_progress = float(p0 + frac * (self.row_end[e] - p0))

    def _row(self, progress: float) -> int:
        return min(bisect_right(self._row_end, progress), self.rows - 1)

    def grad_stats(self, global_batch: float, progress: float) -> tuple[float, float]:
        e = self._row(progress)
        key = (global_batch, e)
        out = self._cache.get(key)
        if out is None:
            b = min(max(float(global_batch), self.batches[0]), self.batches[-1])
            out = self._cache[key] = (float(np.interp(b, self.batches, self.sqr[:, e])),
                                      float(np.interp(b, self.batches, self.var[:, e])))
        return out

    def gain(self, global_batch: float, progress: float) -> float:
        """Progress per step at this global batch (1 at the smallest measured batch), clipped
        to [1, s] as AdaScale's gain is: a measured grad_sqr below 0 (an unbiased estimate on
        a few batches can be) would otherwise promise more than linear scaling."""
        sqr, var = self.grad_stats(global_batch, progress)
        s = global_batch / self.init_batch
        denom = var / s + sqr
        g = (var + sqr) / denom if denom > 0 else s
        return float(min(max(g, min(1.0, s)), max(1.0, s)))

    def noise_scale(self, global_batch: float, progress: float) -> float:
        sqr, var = self.grad_stats(global_batch, progress)
        return self.init_batch * var / sqr if sqr > 0 else float("inf")


# ----------------------------------------------------------------------------- workload
@dataclass
class ChunkResult:
    progress: float
    seconds: float            # training seconds (restart excluded)
    worker_seconds: float
    restart_seconds: float
    restart_workers: int
    oom: bool
    done: bool
    setting: Setting          # the setting the chunk ran under (after any OOM back-off)

    def cost(self, lam: float) -> float:
        return self.worker_seconds + lam * self.seconds + self.restart_seconds * (self.restart_workers + lam)


class Workload:
    """A trace folder turned into a cost model. ``holdout`` rows are left out of the fit."""

    def __init__(self, trace: Trace, spec: Optional[WorkloadSpec] = None, holdout_every: int = 3):
        self.trace = trace
        self.name = trace.name
        self.spec = spec or WorkloadSpec.from_dict(trace.spec)
        full = np.asarray([p == FULL_PRECISION for p in trace.precision])
        self.holdout = np.zeros(len(full), dtype=bool)
        for p in PRECISIONS:              # every third row of each precision is held out of its fit
            idx = np.flatnonzero([q == p for q in trace.precision])
            if holdout_every and len(idx) >= 2 * holdout_every:
                self.holdout[idx[1::holdout_every]] = True
        fit = full & ~self.holdout
        t = trace
        self.perf = PerfModel.fit(t.nodes[fit], t.replicas[fit], t.local_bsz[fit], t.step_time[fit], t.sync_time[fit])
        # reduced precisions measured at >= 2 batch sizes: compute constants of their own
        self.perf_by_precision: dict = {}
        for p in PRECISIONS[1:]:
            m = np.asarray([q == p for q in t.precision]) & ~self.holdout
            if m.sum() >= 3 and len(np.unique(t.local_bsz[m])) >= 2:
                self.perf_by_precision[p] = PerfModel.fit(t.nodes[m], t.replicas[m], t.local_bsz[m],
                                                          t.step_time[m], t.sync_time[m])
        self.stat = StatModel(trace.validation, self.spec.target_metric)
        self.min_local = int(t.local_bsz[full].min())
        self.cap = int(self.spec.memory_cap or t.local_bsz[full].max())
        self.precision = {FULL_PRECISION: {"speed": 1.0, "memory": 1.0, "source": "reference"}}
        self.precision.update(self._measured_precision())
        for p, f in self.spec.precision.items():
            self.precision.setdefault(p, dict(f))
        gpn = self.spec.gpus_per_node
        measured = [t.replicas[i] for i in range(len(t.placement)) if t.placement[i]]
        max_workers = self.spec.max_workers or int(max(measured))
        ladder, w = [], 1
        while w <= max_workers:
            ladder.append(w)
            w *= 2
        self.worker_ladder = ladder
        # per-worker batches: the smallest measured batch doubled up to twice the memory cap
        self.limits = Limits(min_batch=self.min_local, max_batch=self.min_local * 2 ** self._doublings(),
                             batch_factor=2.0, precisions=tuple(self.precision),
                             min_workers=1, max_workers=ladder[-1])
        self.gpus_per_node = gpn
        self._step_cache, self._net_cache = {}, {}
        sw = min(self.spec.static_workers, ladder[-1])
        self.static_default = Setting(self.min_local, FULL_PRECISION, sw)

    def _doublings(self) -> int:
        k = 0
        while self.min_local * 2 ** (k + 1) <= 2 * self.cap:
            k += 1
        return k

    def _measured_precision(self) -> dict:
        """Speed factor of a reduced precision measured in the trace (median ratio of compute
        time at equal placement and local batch); memory factor stays assumed."""
        t, out = self.trace, {}
        ref = {(t.placement[i], float(t.local_bsz[i])): t.step_time[i] - t.sync_time[i]
               for i in range(len(t.precision)) if t.precision[i] == FULL_PRECISION}
        for p in PRECISIONS[1:]:
            ratios = [(t.step_time[i] - t.sync_time[i]) / ref[(t.placement[i], float(t.local_bsz[i]))]
                      for i in range(len(t.precision)) if t.precision[i] == p
                      and (t.placement[i], float(t.local_bsz[i])) in ref]
            if ratios:
                mem = self.spec.precision.get(p, {}).get("memory", 1.0)
                out[p] = {"speed": float(np.median(ratios)), "memory": float(mem),
                          "source": f"measured: median of {len(ratios)} step pairs in {t.folder.name}"}
        return out

    # -- the deterministic cost model (also the goodput advisor's step-time model)
    @property
    def init_batch(self) -> int:
        """B0: the batch progress is counted in (the smallest validation run's)."""
        return self.stat.init_batch

    @property
    def restart_seconds(self) -> float:
        return self.spec.restart_seconds

    def nodes_of(self, workers: int) -> int:
        return math.ceil(workers / self.gpus_per_node)

    def step_time(self, s: Setting, interference: float = 1.0) -> float:
        key = (s.batch_size, s.precision, s.workers, interference)
        t = self._step_cache.get(key)
        if t is None:      # the simulator asks for the same few settings millions of times
            perf, speed = self.perf_model(s.precision)
            t = self._step_cache[key] = float(perf.step(s.batch_size, self.nodes_of(s.workers), s.workers,
                                                        speed, interference))
        return t

    def perf_model(self, precision: str) -> tuple:
        """(PerfModel, speed factor) of a precision: its own fit where it was measured at
        several batch sizes, else fp32's with the speed factor."""
        own = self.perf_by_precision.get(precision)
        return (own, 1.0) if own is not None else (self.perf, self.precision[precision]["speed"])

    def busy_time(self, s: Setting) -> float:
        """The batch-proportional part of a step (what a utilisation monitor sees as busy)."""
        perf, speed = self.perf_model(s.precision)
        return perf.beta_c * s.batch_size * speed

    def network_time(self, workers: int) -> float:
        t = self._net_cache.get(workers)
        if t is None:
            t = self._net_cache[workers] = float(self.perf.network(self.nodes_of(workers), workers))
        return t

    def memory_used(self, s: Setting) -> float:
        base = self.spec.memory_base
        return base + (0.95 - base) * s.batch_size * self.precision[s.precision]["memory"] / self.cap

    def fits(self, s: Setting) -> bool:
        return self.memory_used(s) <= 0.95 + 1e-9

    def backoff(self, s: Setting) -> Setting:
        """The largest batch on the ladder that fits (what the online plugin's OOM guard does)."""
        while not self.fits(s) and s.batch_size > self.limits.min_batch:
            s = next_setting(s, "batch_down", self.limits)
        return s

    def rate(self, s: Setting, progress: float, interference: float = 1.0) -> float:
        """Progress per second."""
        return self.stat.gain(s.global_batch, progress) / self.step_time(s, interference)

    def chunk_seconds(self, s: Setting, p0: float, p1: float, interference: float = 1.0) -> float:
        """Seconds to go from progress p0 to p1 (rate evaluated at the chunk's midpoint)."""
        return (p1 - p0) / self.rate(s, 0.5 * (p0 + p1), interference)

    def chunk_bounds(self) -> np.ndarray:
        return np.linspace(0.0, self.stat.target_progress, self.spec.decisions + 1)

    def settings(self) -> list[Setting]:
        """Every setting on the ladders that fits in memory."""
        out, b = [], self.limits.min_batch
        while b <= self.limits.max_batch:
            for p in self.limits.precisions:
                for w in self.worker_ladder:
                    s = Setting(b, p, w)
                    if self.fits(s):
                        out.append(s)
            b *= 2
        return out

    def needs_restart(self, a: Setting, b: Setting) -> bool:
        return a.precision != b.precision or a.workers != b.workers

    def describe(self) -> dict:
        return {"name": self.name, "folder": str(self.trace.folder), "init_batch": self.stat.init_batch,
                "target_metric": self.stat.target_metric, "target_progress": self.stat.target_progress,
                "min_local_batch": self.min_local, "memory_cap_local_batch": self.cap,
                "worker_ladder": self.worker_ladder, "precision": self.precision,
                "static_default": asdict(self.static_default), "perf_model": asdict(self.perf),
                "perf_model_by_precision": {p: asdict(m) for p, m in self.perf_by_precision.items()},
                "restart_seconds": self.spec.restart_seconds, "decisions": self.spec.decisions}


# ----------------------------------------------------------------------------- environment
class ClusterSim:
    """One job on the simulated cluster, driven one decision at a time.

    ``observe()`` gives the monitor's reading under the current setting; ``step(action)``
    applies the action (restart if needed, OOM back-off) and trains one chunk of progress.
    With ``noise=False`` it is the deterministic cost model the oracle plans on.
    """

    def __init__(self, workload: Workload, seed: int = 0, noise: bool = True,
                 start: Optional[Setting] = None, start_chunk: int = 0):
        self.w = workload
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        sp = workload.spec
        self.interference = float(self.rng.lognormal(0.0, sp.interference_cv)) if noise else 1.0
        self.setting = workload.backoff(start or workload.static_default)
        self.bounds = workload.chunk_bounds()
        self.k = int(start_chunk)          # > 0: a job resumed part-way (exploring starts in training)

    @property
    def progress(self) -> float:
        return float(self.bounds[self.k])

    @property
    def done(self) -> bool:
        return self.k >= len(self.bounds) - 1

    @property
    def progress_fraction(self) -> float:
        return self.k / (len(self.bounds) - 1)

    def observe(self) -> Signals:
        w, s, sp = self.w, self.setting, self.w.spec
        step = w.step_time(s, self.interference)
        util = w.busy_time(s) / step
        noise_scale = w.stat.noise_scale(s.global_batch, self.progress)
        net = w.network_time(s.workers) * self.interference
        if self.noise:
            util += self.rng.normal(0.0, sp.utilisation_sd)
            noise_scale *= float(self.rng.lognormal(0.0, sp.noise_scale_cv))
        return Signals(utilisation=min(max(float(util), 0.0), 1.0),
                       free_memory=min(max(1.0 - w.memory_used(s), 0.0), 1.0),
                       comm_latency_ms=1000.0 * net, noise_scale=float(noise_scale))

    def step(self, action: "int | str | Setting") -> ChunkResult:
        """One decision: an action of ACTIONS, or a Setting to jump to (a policy that
        re-allocates freely, like Pollux); then one chunk of progress."""
        if self.done:
            raise DsframeError("the simulated job is already done")
        w = self.w
        if isinstance(action, Setting):
            if not w.limits.contains(action):
                raise ConfigError("setting", action, f"a setting inside {w.limits}")
            new = action
        else:
            new = next_setting(self.setting, action, w.limits)
        restart = w.spec.restart_seconds if w.needs_restart(self.setting, new) else 0.0
        oom = not w.fits(new)
        if oom:                                   # crashes at its first step, restarts backed off
            new = w.backoff(new)
            restart += w.spec.restart_seconds
        p0, p1 = self.bounds[self.k], self.bounds[self.k + 1]
        seconds = w.chunk_seconds(new, p0, p1, self.interference)
        if self.noise:
            seconds *= float(self.rng.lognormal(0.0, w.spec.step_time_cv))
        self.setting = new
        self.k += 1
        return ChunkResult(progress=p1 - p0, seconds=seconds, worker_seconds=seconds * new.workers,
                           restart_seconds=restart, restart_workers=new.workers, oom=oom,
                           done=self.done, setting=new)


# ----------------------------------------------------------------------------- calibration
def calibration_error(workload: Workload) -> dict:
    """Simulated vs measured step time for every row of the trace: relative error
    |sim − meas| / meas, summarised over the held-out rows (not used in the fit) and all
    rows, per precision, plus per setting for the placements the simulator uses (workers
    packed on nodes). A reduced precision is simulated as the simulator does (its own fit, or
    fp32's times its speed factor)."""
    t, w = workload.trace, workload
    sim = np.empty(len(t.step_time))
    for p in set(t.precision):
        m = np.asarray([q == p for q in t.precision])
        perf, speed = w.perf_model(p) if p in w.precision else (w.perf, 1.0)
        sim[m] = perf.step(t.local_bsz[m], t.nodes[m], t.replicas[m], speed)
    err = np.abs(sim - t.step_time) / t.step_time
    full = np.asarray([p == FULL_PRECISION for p in t.precision])
    every = np.ones(len(err), dtype=bool)

    def summary(mask):
        e = err[mask]
        if not len(e):
            return None
        return {"rows": int(len(e)), "mean_abs_pct": round(100 * float(e.mean()), 2),
                "median_abs_pct": round(100 * float(np.median(e)), 2),
                "p90_abs_pct": round(100 * float(np.quantile(e, 0.9)), 2),
                "max_abs_pct": round(100 * float(e.max()), 2)}

    used = {placement_of(n, w.gpus_per_node) for n in w.worker_ladder}
    per_setting = [{"workers": int(t.replicas[i]), "placement": t.placement[i], "local_bsz": float(t.local_bsz[i]),
                    "precision": t.precision[i],
                    "measured_s": round(float(t.step_time[i]), 5), "simulated_s": round(float(sim[i]), 5),
                    "abs_pct": round(100 * float(err[i]), 2), "held_out": bool(w.holdout[i])}
                   for i in range(len(err)) if t.placement[i] in used]
    by_precision = {p: {"held_out": summary(m & w.holdout), "all": summary(m)}
                    for p in sorted(set(t.precision))
                    for m in [np.asarray([q == p for q in t.precision])]}
    return {"held_out": summary(every & w.holdout), "all": summary(every), "fit": summary(every & ~w.holdout),
            "fp32_held_out": summary(full & w.holdout), "by_precision": by_precision,
            "per_setting": per_setting}
