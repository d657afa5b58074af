"""Pipeline stages: balanced split by per-layer cost, stage modules, schedules.

Balancing. Each pipeline unit (a transformer block) has a cost — estimated from FLOPs
(``model.layer_flops``) or measured (forward+backward wall time of the unit on a sample). The
embedding is charged to the first unit and the LM head to the last, since they travel with the
end stages. Contiguous units are then split into ``num_stages`` groups minimising the most
expensive stage (exact dynamic programme, O(stages · units²)). The imbalance reported is
``max(stage cost) / min(stage cost) − 1``.

Schedules come from ``torch.distributed.pipelining``: GPipe, 1F1B and interleaved 1F1B (two
virtual stages per rank, looped: rank r holds stages r and r + pp).
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


def estimate_costs(model: nn.Module, seq_len: int) -> dict[str, float]:
    """FLOP-based cost of each unit, embedding folded into the first, head into the last."""
    flops = model.layer_flops(seq_len)
    units = model.pipeline_units()
    costs = {u: 3.0 * flops[u] for u in units}          # forward + backward ≈ 3 × forward
    costs[units[0]] += 3.0 * flops.get("embed", 0.0)
    costs[units[-1]] += 3.0 * flops.get("head", 0.0)
    return costs


def measure_costs(model: nn.Module, sample: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """Measured forward+backward seconds of each unit on ``sample`` (input ids [B, T]).

    Embedding and head are measured too and folded into the first and last unit."""
    units = model.pipeline_units()
    times = {}

    def timed(fn, x):
        best = float("inf")
        for _ in range(repeats):
            x_ = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            out = fn(x_)
            out.float().sum().backward()
            best = min(best, time.perf_counter() - t0)
        return best

    with torch.enable_grad():
        T = sample.shape[1]
        embed = lambda ids: model.wte(ids) + model.wpe(torch.arange(T, device=ids.device))  # noqa: E731
        t_embed = timed(embed, sample)
        h = embed(sample).detach()
        for u in units:
            times[u] = timed(model.blocks[u], h)
        t_head = timed(lambda x: model.lm_head(model.ln_f(x)), h)
    model.zero_grad(set_to_none=True)
    times[units[0]] += t_embed
    times[units[-1]] += t_head
    return times


def plan_stages(model: nn.Module, num_stages: int, seq_len: int, method: str = "flops",
                sample: torch.Tensor | None = None) -> StagePlan:
    units = model.pipeline_units()
    if method == "measured":
        if sample is None:
            sample = torch.randint(0, model.config.vocab_size, (2, seq_len))
        costs = measure_costs(model, sample)
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


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Stages held by a pp rank: looped assignment (r, r + pp, ...) as interleaved 1F1B expects."""
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def build_schedule(name: str, stages: list, n_microbatches: int, loss_fn):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if name == "gpipe":
        return ScheduleGPipe(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=True)
    if name == "1f1b":
        return Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=True)
    if name == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=True)
    raise ValueError(f"pipeline schedule {name!r}")
