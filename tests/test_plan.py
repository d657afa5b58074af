"""The layout planner: the seed article's table and 30B example, explanations, CLI errors, and the
time model against Megatron-LM's published throughput (benchmarks/plan_vs_megatron.py)."""
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dsframe.errors import ConfigError
from dsframe.plan import Cluster, Workload, _parse, evaluate, iteration_flops, recommend

# The published table and its sources live in the benchmark script; one copy for both.
_spec = importlib.util.spec_from_file_location(
    "plan_vs_megatron", Path(__file__).resolve().parents[1] / "benchmarks" / "plan_vs_megatron.py")
bench = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)   # dataclasses look the module up
_spec.loader.exec_module(bench)


def pick(params, gpus, mem=80):
    best, _ = recommend(Cluster(gpus=gpus, gpu_mem_gb=mem), Workload(params=params))
    return best


def test_seed_example_30b_on_256_gpus():
    b = pick(30e9, 256)
    assert b.dp * b.tp * b.pp == 256
    assert 8 <= b.dp <= 16 and 4 <= b.tp <= 8 and 2 <= b.pp <= 4
    assert b.micro_batches >= 4 * b.pp       # bubble (p−1)/(m+p−1) kept small
    assert b.mem_gb <= 0.9 * 80


@pytest.mark.parametrize("params,gpus", [(30e9, 128), (50e9, 128), (50e9, 256), (70e9, 256), (70e9, 512),
                                         (100e9, 256), (100e9, 512)])
def test_seed_table_10b_to_100b(params, gpus):
    b = pick(params, gpus)
    assert (8 <= b.dp <= 16, 4 <= b.tp <= 8, 2 <= b.pp <= 4) == (True, True, True), b


@pytest.mark.parametrize("params,gpus", [(110e9, 1024), (150e9, 2048), (175e9, 1024), (175e9, 2048), (190e9, 1024)])
def test_seed_table_above_100b(params, gpus):
    b = pick(params, gpus)
    assert (16 <= b.dp <= 32, 8 <= b.tp <= 16, 4 <= b.pp <= 8) == (True, True, True), b


def test_memory_drives_pipeline_depth():
    # less memory per GPU → more model parallelism, never less
    a, b = pick(30e9, 256, mem=80), pick(30e9, 256, mem=40)
    assert b.tp * b.pp > a.tp * a.pp
    # the chosen layout fits, the next smaller pipeline with the same tp does not
    smaller = evaluate(Cluster(gpus=256), Workload(params=30e9), 256 // (a.tp * a.pp // 2), a.tp, a.pp // 2)
    assert not smaller.fits


def _gpipe_idle_share(stages: int, micro_batches: int) -> float:
    """Idle share of a GPipe forward pass, counted on its timeline: at tick t stage s works on
    micro-batch t - s if there is one."""
    ticks = micro_batches + stages - 1
    busy = sum(1 for t in range(ticks) for s in range(stages) if 0 <= t - s < micro_batches)
    return 1 - busy / (ticks * stages)


@pytest.mark.parametrize("mbs,pp,m,bubble", [(1, 2, 64, 1 / 65), (4, 4, 16, 3 / 19), (8, 8, 8, 7 / 15)])
def test_bubble_is_the_idle_share_of_the_schedule(mbs, pp, m, bubble):
    # 1024 sequences per step over dp=16 replicas in micro-batches of `mbs`: m = 1024 / (16 · mbs)
    lay = evaluate(Cluster(gpus=256), Workload(params=30e9, micro_batch_size=mbs), 16, 4, pp)
    assert lay.micro_batches == m
    assert lay.bubble == pytest.approx(bubble) == pytest.approx(_gpipe_idle_share(pp, m))


def test_too_small_cluster_is_a_config_error():
    with pytest.raises(ConfigError, match="no layout of 8 × 80 GB fits"):
        recommend(Cluster(gpus=8), Workload(params=175e9))


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "dsframe.plan", *args], capture_output=True, text=True, timeout=60)


def test_cli_explains_and_json():
    out = run_plan("params=30e9", "gpus=256", "gpu_mem_gb=80")
    assert out.returncode == 0, out.stderr
    assert "recommended: dp=" in out.stdout
    assert "why (tp inside a node, the smallest tp·pp that fits" in out.stdout and "does not fit" in out.stdout
    assert "TFLOP/s per GPU" in out.stdout and "% weak" in out.stdout and "% strong" in out.stdout
    js = run_plan("params=30e9", "gpus=256", "--json")
    rec = json.loads(js.stdout)["recommended"]
    assert rec["dp"] * rec["tp"] * rec["pp"] == 256
    for key in ("step_time_s", "tflops_per_gpu", "tokens_per_s_per_gpu", "scaling_efficiency_weak",
                "scaling_efficiency_strong", "t_bubble", "t_opt"):
        assert rec[key] > 0, key


def test_cli_bad_input_one_line_exit_1():
    out = run_plan("params=30e9", "gpus=256", "gpu_mem=80")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "gpu_mem" in out.stderr and "gpu_mem_gb" in out.stderr


def test_cli_booleans():
    _, w, _ = _parse(["params=30e9", "gpus=256", "recompute=true", "flash_attention=0"])
    assert w.recompute is True and w.flash_attention is False
    with pytest.raises(ConfigError, match="true or false"):
        _parse(["params=30e9", "gpus=256", "recompute=yes please"])


# Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters using
# Megatron-LM"), Table 1, the rows with model parallelism across a whole node (tp = 8): given their shapes,
# batches and GPU counts (A100 80 GB, seq 2048) the planner picks their tp and pp.
@pytest.mark.parametrize("row", [r for r in bench.TABLE_1 if r.tp == 8], ids=lambda r: r.name)
def test_reproduces_megatron_table_1(row):
    w = Workload(params=row.params_b * 1e9, layers=row.layers, hidden=row.hidden, heads=row.heads,
                 global_batch=row.batch)
    best, _ = recommend(Cluster(gpus=row.gpus), w)
    assert (best.tp, best.pp, best.dp) == (row.tp, row.pp, row.gpus // (row.tp * row.pp))


def test_iteration_flops_by_hand_1t_row():
    # Counted matmul by matmul for the 1T row: per layer and token a forward pass does QKV 2·h·3h, scores 2·s·h,
    # context 2·s·h, projection 2·h·h, MLP 2·h·4h twice; with full recomputation 4 passes (forward, recomputed
    # forward, backward = 2); the logits 2·h·V in 3 passes (never recomputed).
    B, s, l, h, V = 3072, 2048, 128, 25600, 51200
    layer = 6 * h * h + 2 * s * h + 2 * s * h + 2 * h * h + 2 * 8 * h * h
    by_hand = B * s * (l * 4 * layer + 3 * 2 * h * V)
    assert by_hand == pytest.approx(5.139051e19, rel=1e-6)
    f = iteration_flops(bench.megatron_workload(bench.TABLE_1[-1]))
    assert f == pytest.approx(by_hand, rel=1e-12)
    assert f == pytest.approx(96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h)), rel=1e-12)
    # without recomputation: 3 passes, Korthikanti et al.'s 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))
    f3 = iteration_flops(replace(bench.megatron_workload(bench.TABLE_1[-1]), recompute=False))
    assert f3 == pytest.approx(72 * B * s * l * h * h * (1 + s / (6 * h) + V / (12 * l * h)), rel=1e-12)


def test_matmul_eff_is_solved_on_the_1_7b_row_only():
    # the one calibrated constant: Cluster's default is the value that reproduces the 1.7B row (tp = pp = 1)
    assert Cluster(gpus=1).matmul_eff == round(bench.calibrate(), 2)


# matmul_eff solved on the 1.7B row only; the other nine rows land at -3.9 % … +4.1 % of the published
# TFLOP/s per GPU (mean 2.4 %, benchmarks/results/plan_vs_megatron.md). 5 % is that worst error rounded up.
TFLOPS_TOLERANCE = 0.05


@pytest.mark.parametrize("row", bench.TABLE_1, ids=lambda r: r.name)
def test_predicts_megatron_table_1_throughput(row):
    lay = bench.predict(row)
    assert lay.fits, lay.why_not
    assert lay.tflops_per_gpu == pytest.approx(row.tflops, rel=TFLOPS_TOLERANCE)


def test_scaling_efficiency_at_most_one_and_falls_with_bubble():
    c, w = Cluster(gpus=256), Workload(params=30e9)
    # fewer micro-batches per replica (bigger micro-batches) → bigger bubble → lower efficiency at a fixed batch
    lays = [evaluate(c, replace(w, micro_batch_size=mbs), 16, 8, 2) for mbs in (1, 2, 4, 8)]
    assert [x.bubble for x in lays] == sorted(x.bubble for x in lays)
    strong = [x.scaling_efficiency_strong for x in lays]
    assert strong == sorted(strong, reverse=True) and len(set(strong)) == 4
    for x in lays:
        assert 0 < x.scaling_efficiency_strong <= x.scaling_efficiency_weak <= 1
    # more stages at the same dp and tp: more bubble, lower efficiency
    stages = [evaluate(Cluster(gpus=8 * 4 * pp), w, 8, 4, pp) for pp in (2, 4, 8)]
    assert [x.bubble for x in stages] == sorted(x.bubble for x in stages)
    strong = [x.scaling_efficiency_strong for x in stages]
    assert strong == sorted(strong, reverse=True) and len(set(strong)) == 3
    # one model-parallel group is its own baseline
    assert evaluate(Cluster(gpus=16), w, 1, 8, 2).scaling_efficiency_strong == 1.0
