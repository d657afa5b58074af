"""Pipeline stage balancing: optimal contiguous split, imbalance reported and small where layers allow."""
import itertools
import random

import pytest
import torch

from dsframe.models.gpt import GPT, GPTConfig
from dsframe.parallel.pipeline import balance, plan_stages, stage_ids


def brute_force(costs, k):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = [0, *cuts, n]
        worst = max(sum(costs[b[i]:b[i + 1]]) for i in range(k))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_balance_is_optimal(seed):
    rng = random.Random(seed)
    costs = [rng.uniform(0.1, 5.0) for _ in range(rng.randint(4, 9))]
    k = rng.randint(2, min(4, len(costs)))
    bounds = balance(costs, k)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(costs)
    assert all(a < b for a, b in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(k - 1))
    assert max(sum(costs[a:b]) for a, b in bounds) == pytest.approx(brute_force(costs, k))


def test_balance_rejects_more_stages_than_layers():
    with pytest.raises(ValueError, match="3 stages > 2 layers"):
        balance([1.0, 1.0], 3)


@pytest.mark.parametrize("n_layer,pp", [(8, 2), (8, 4), (12, 4)])
def test_gpt_stage_imbalance_within_15_percent(n_layer, pp):
    m = GPT.build(GPTConfig(vocab_size=256, block_size=64, n_layer=n_layer, n_head=4, n_embd=64))
    plan = plan_stages(m, pp, seq_len=64)
    assert [u for s in plan.stages for u in s] == [str(i) for i in range(n_layer)]
    # each stage costs what its blocks cost, and the dearest stage is as cheap as any split allows
    assert plan.costs == pytest.approx([sum(plan.unit_costs[u] for u in s) for s in plan.stages])
    assert max(plan.costs) == pytest.approx(brute_force([plan.unit_costs[str(i)] for i in range(n_layer)], pp))
    assert plan.imbalance <= 0.15
    # never worse than cutting the blocks evenly, measured in the same costs
    uniform = plan_stages(m, pp, seq_len=64, method="uniform")
    even = [sum(plan.unit_costs[u] for u in s) for s in uniform.stages]
    assert plan.imbalance <= max(even) / min(even) - 1 + 1e-12


def test_heavy_head_shifts_layers_to_the_first_stage():
    # a big vocabulary makes the last stage's head expensive: balance gives that stage fewer blocks
    m = GPT.build(GPTConfig(vocab_size=4096, block_size=32, n_layer=6, n_head=2, n_embd=32))
    plan = plan_stages(m, 2, seq_len=32)
    assert len(plan.stages[0]) > len(plan.stages[1])
    even = [sum(plan.unit_costs[u] for u in s) for s in (["0", "1", "2"], ["3", "4", "5"])]
    assert plan.imbalance < max(even) / min(even) - 1


def test_measured_costs_run():
    torch.manual_seed(0)
    m = GPT.build(GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=32))
    plan = plan_stages(m, 2, seq_len=16, method="measured")
    assert plan.method == "measured" and len(plan.stages) == 2 and all(c > 0 for c in plan.costs)
    assert all(p.grad is None for p in m.parameters())


def test_interleaved_stage_ids_loop():
    assert stage_ids(0, 2, 2) == [0, 2] and stage_ids(1, 2, 2) == [1, 3]
    assert stage_ids(1, 4, 1) == [1]
