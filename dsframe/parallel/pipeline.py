"""Pipeline stages: balanced split by per-layer cost, stage modules, schedules.

Balancing. Each pipeline unit (``model.pipeline_units()``, e.g. a transformer block) has a cost —
estimated from FLOPs (``model.layer_flops``) or measured (forward+backward wall time of a one-unit
stage on ``model.pipeline_example``). The input end (embedding) is charged to the first unit and
the output end (head) to the last, since they travel with the end stages. Contiguous units are then split into ``num_stages`` groups minimising the most
expensive stage (exact dynamic programme, O(stages · units²)). The imbalance reported is
``max(stage cost) / min(stage cost) − 1``.

Schedules come from ``torch.distributed.pipelining``: GPipe, 1F1B, interleaved 1F1B and interleaved
zero-bubble (two virtual stages per rank, looped: rank r holds stages r and r + pp), and the
zero-bubble V schedules ZB-V and DualPipeV (V-shaped: rank r holds r and 2·pp − 1 − r). The
zero-bubble ones split each backward into input gradient (sent on at once) and weight gradient
(deferred into what would be idle time).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class StagePlan:
    stages: list[list[str]]          # unit names per stage
    costs: list[float]               # cost per stage (same unit as the unit costs)
    unit_costs: dict[str, float] = field(default_factory=dict)
    method: str = "flops"

    @property
    def imbalance(self) -> float:
        return max(self.costs) / min(self.costs) - 1.0

    def as_dict(self) -> dict:
        return {"stages": self.stages, "costs": self.costs, "imbalance": self.imbalance, "method": self.method}


def balance(costs: list[float], num_stages: int) -> list[tuple[int, int]]:
    """Split ``costs`` into ``num_stages`` contiguous non-empty ranges minimising the max range sum.

    Ties (same max) are broken by the smaller spread max−min. Returns [(start, end), ...)."""
    n = len(costs)
    if num_stages > n:
        raise ValueError(f"{num_stages} stages > {n} layers")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    s = lambda i, j: prefix[j] - prefix[i]  # noqa: E731
    INF = float("inf")
    # best[k][j]: (max, -min) over splits of costs[:j] into k stages
    best = [[(INF, INF)] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, -INF)
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                prev_max, prev_negmin = best[k - 1][i]
                if prev_max == INF:
                    continue
                c = s(i, j)
                cand = (max(prev_max, c), max(prev_negmin, -c))
                if cand < best[k][j]:
                    best[k][j], cut[k][j] = cand, i
    bounds, j = [], n
    for k in range(num_stages, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def estimate_costs(model: nn.Module, seq_len: int | None) -> dict[str, float]:
    """FLOP-based cost of each unit, the input end folded into the first, the output end into the last."""
    flops = model.layer_flops(seq_len)
    units = model.pipeline_units()
    costs = {u: 3.0 * flops[u] for u in units}          # forward + backward ≈ 3 × forward
    costs[units[0]] += 3.0 * flops.get("embed", 0.0)
    costs[units[-1]] += 3.0 * flops.get("head", 0.0)
    return costs


def measure_costs(model: nn.Module, example: dict, repeats: int = 3,
                  device: torch.device | None = None) -> dict[str, float]:
    """Measured forward+backward seconds of each unit, as a one-unit pipeline stage (the first with
    the input end, the last with the output end) fed the previous one's output, starting from
    ``model.pipeline_inputs(example)``, on ``device`` (default: where the model is; the strategy
    passes the rank's own, so a GPU run balances GPU times). The stages are copies: the model's
    gradients stay untouched."""
    units = model.pipeline_units()
    n = len(units)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = tuple(t.to(device) for t in model.pipeline_inputs(example))
    times = {}
    with torch.enable_grad():
        for i, u in enumerate(units):
            stage = model.pipeline_stage([u], first=i == 0, last=i == n - 1).to(device)
            best = float("inf")
            for _ in range(repeats):
                args = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in x)
                sync()
                t0 = time.perf_counter()
                out = stage(*args)
                outs = out if isinstance(out, tuple) else (out,)
                sum(o.float().sum() for o in outs if o.requires_grad).backward()
                sync()
                best = min(best, time.perf_counter() - t0)
            times[u] = best
            with torch.no_grad():
                out = stage(*x)
            x = out if isinstance(out, tuple) else (out,)
    return times


def plan_stages(model: nn.Module, num_stages: int, seq_len: int | None = None, method: str = "flops",
                example: dict | None = None, device: torch.device | None = None) -> StagePlan:
    """Contiguous split of ``model.pipeline_units()`` into ``num_stages`` stages of balanced cost
    (``device``: where ``measured`` times the units)."""
    units = model.pipeline_units()
    if method == "measured":
        costs = measure_costs(model, example if example is not None else model.pipeline_example(2, seq_len),
                              device=device)
    elif method == "flops":
        costs = estimate_costs(model, seq_len)
    elif method == "uniform":
        costs = {u: 1.0 for u in units}
    else:
        raise ValueError(f"stage balancing method {method!r}: one of flops, measured, uniform")
    vec = [costs[u] for u in units]
    bounds = balance(vec, num_stages)
    return StagePlan(stages=[units[i:j] for i, j in bounds], costs=[sum(vec[i:j]) for i, j in bounds],
                     unit_costs=costs, method=method)


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int, v_shaped: bool = False) -> list[int]:
    """Stages held by a pp rank: looped (r, r + pp, ...) as the interleaved schedules expect, or
    V-shaped (r, 2·pp − 1 − r) as ZB-V and DualPipeV do (rank 0 holds the first and the last)."""
    if v_shaped:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def build_schedule(name: str, stages: list, n_microbatches: int, loss_fn):
    from torch.distributed.pipelining import schedules as s

    single = {"gpipe": s.ScheduleGPipe, "1f1b": s.Schedule1F1B}
    multi = {"interleaved_1f1b": s.ScheduleInterleaved1F1B, "interleaved_zb": s.ScheduleInterleavedZeroBubble,
             "zbv": s.ScheduleZBVZeroBubble, "dualpipev": s.ScheduleDualPipeV}
    if name in single:
        return single[name](stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=True)
    if name in multi:
        return multi[name](stages, n_microbatches, loss_fn=loss_fn, scale_grads=True)
    raise ValueError(f"pipeline schedule {name!r}")
