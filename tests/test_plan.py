"""The layout planner: the seed article's table and 30B example, explanations, CLI errors."""
import json
import subprocess
import sys

import pytest

from dsframe.errors import ConfigError
from dsframe.plan import Cluster, Workload, evaluate, recommend


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
    js = run_plan("params=30e9", "gpus=256", "--json")
    rec = json.loads(js.stdout)["recommended"]
    assert rec["dp"] * rec["tp"] * rec["pp"] == 256


def test_cli_bad_input_one_line_exit_1():
    out = run_plan("params=30e9", "gpus=256", "gpu_mem=80")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "gpu_mem" in out.stderr and "gpu_mem_gb" in out.stderr


# Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters using
# Megatron-LM"), Table 1: params, layers, hidden, heads, global batch, GPUs → tp, pp (A100 80 GB, seq 2048)
MEGATRON_TABLE_1 = [
    (18.4e9, 40, 6144, 48, 1024, 256, 8, 1),
    (39.1e9, 48, 8192, 64, 1536, 512, 8, 2),
    (76.1e9, 60, 10240, 80, 1792, 1024, 8, 4),
    (145.6e9, 80, 12288, 96, 2304, 1536, 8, 8),
    (310.1e9, 96, 16384, 128, 2160, 1920, 8, 16),
    (529.6e9, 105, 20480, 128, 2520, 2520, 8, 35),
    (1008e9, 128, 25600, 160, 3072, 3072, 8, 64),
]


@pytest.mark.parametrize("row", MEGATRON_TABLE_1, ids=lambda r: f"{r[0] / 1e9:g}B")
def test_reproduces_megatron_table_1(row):
    params, layers, hidden, heads, batch, gpus, tp, pp = row
    best, _ = recommend(Cluster(gpus=gpus), Workload(params=params, layers=layers, hidden=hidden, heads=heads,
                                                     global_batch=batch))
    assert (best.tp, best.pp, best.dp) == (tp, pp, gpus // (tp * pp))
