"""The CUDA/NCCL path, as far as a CPU machine can check it: each rank selects its own device before
the process group exists, nothing in the parent initialises CUDA (forked ranks could not use it
then), the GPU benchmark skips what the visible GPUs cannot run and refuses to start without GPUs,
and the one-process reference it runs in a forked child trains exactly like one in-process; and
the benchmark's bubble at the measured stage times, which tells imbalance from communication."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("parallel_benchmark", REPO / "benchmarks" / "parallel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Stop(Exception):
    pass


def test_each_rank_selects_its_device_before_the_process_group(monkeypatch):
    from lightning.fabric.plugins.environments import LightningEnvironment

    from dsframe.parallel.strategy import HybridParallelStrategy

    calls = []

    class RecordingAccelerator:
        def setup_device(self, device):
            calls.append(("setup_device", device))

    def process_group():
        calls.append(("process_group",))
        raise _Stop

    monkeypatch.setenv("LOCAL_RANK", "1")
    s = HybridParallelStrategy(dp=2)
    s.cluster_environment = LightningEnvironment()
    s.parallel_devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    s.accelerator = RecordingAccelerator()
    monkeypatch.setattr(s, "_setup_distributed", process_group)
    with pytest.raises(_Stop):
        s.setup_environment()
    assert calls == [("setup_device", torch.device("cuda", 1)), ("process_group",)]


def test_machine_record_and_backend_choice_do_not_initialise_cuda(monkeypatch, tmp_path):
    from dsframe import machine
    from dsframe.strategies import LaunchConfig

    def initialises(*a, **k):
        raise AssertionError("this call initialises CUDA in the process that forks the ranks")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", initialises)
    monkeypatch.setattr(torch.cuda, "get_device_name", initialises)
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200'\necho 'NVIDIA H200'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    machine._nvidia_smi_gpu_name.cache_clear()     # asked once per process: ask this fake one
    info = machine.machine_info()
    assert info["gpus"] == 2 and info["gpu"] == "NVIDIA H200"
    assert LaunchConfig().resolved_backend("auto") == "nccl"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert LaunchConfig().resolved_backend("auto") == "gloo"
    assert "gpus" not in machine.machine_info()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert machine.describe().endswith("; 2 × NVIDIA H200)")


def test_gpu_benchmark_runs_what_the_visible_gpus_can_hold():
    bench = _benchmark()
    two_rank = [n for n, lay in bench.LAYOUTS.items() if bench.world_size(lay) == 2]
    four_rank = [n for n, lay in bench.LAYOUTS.items() if bench.world_size(lay) == 4]
    assert two_rank and four_rank
    names = list(bench.LAYOUTS)
    assert bench.fitting_layouts(names, None) == (names, {})              # CPU ranks: any number
    fit, skipped = bench.fitting_layouts(names, 1)                          # NCCL: one GPU per rank
    assert fit == [] and skipped["tp2"] == "needs 2 GPUs (one per rank), 1 visible"
    fit, skipped = bench.fitting_layouts(names, 2)
    assert fit == two_rank and sorted(skipped) == sorted(four_rank)
    assert bench.fitting_layouts(names, 4) == (names, {})


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_gpu_benchmark_refuses_to_start_without_gpus(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "benchmarks/parallel.py", "--accelerator", "cuda", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "--accelerator cuda: no CUDA device is visible" in last and "--accelerator cpu" in last
    assert not out.exists()
    env = {**os.environ, "PATH": "/usr/bin:/bin"}    # no nvidia-smi there on a CPU machine
    if not any(Path(d, "nvidia-smi").exists() for d in env["PATH"].split(os.pathsep)):
        r = subprocess.run(["bash", "benchmarks/parallel_gpu.sh", str(out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "nvidia-smi is not on PATH" in r.stderr and not out.exists()


def test_reference_in_a_forked_child_trains_like_one_in_process(tmp_path):
    from dsframe.parallel.testing import RunSpec, max_abs_diff, run

    spec = RunSpec(steps=3)
    here = run(spec, str(tmp_path / "here.pt"), fork_reference=False)
    child = run(spec, str(tmp_path / "child.pt"), fork_reference=True)
    assert child["losses"] == here["losses"] and len(here["losses"]) == 3
    assert max_abs_diff(child["params"], here["params"]) == 0.0
    assert max_abs_diff(child["parent_params"], here["parent_params"]) == 0.0


def test_bubble_at_measured_stage_times_separates_imbalance_from_communication():
    bench = _benchmark()

    def ranks(*compute_ms):
        return [{"coords": {"pp": s}, "pipe_ms": {"compute": c}} for s, c in enumerate(compute_ms)]

    for p, m in ((2, 8), (4, 8), (2, 2), (3, 5)):     # equal stages: the schedule's own bubble
        got = bench.bubble_at_stage_times("1f1b", ranks(*[80.0] * p), m)
        assert got == pytest.approx(bench.theory_bubble("1f1b", p, m), abs=1e-12)
    # a stage 10 % slower than the other: the other waits for it on every micro-batch
    slow = bench.bubble_at_stage_times("gpipe", ranks(216.0, 237.6), 8)
    step = 7 * 29.7 + 27.0 + 29.7                  # the slow stage 8 times, the fast one filling
    assert slow == pytest.approx((1 - 8 * 27.0 / step + 1 - 8 * 29.7 / step) / 2)
    assert slow > bench.theory_bubble("gpipe", 2, 8) + 0.02
    assert bench.bubble_at_stage_times("zbv", ranks(100.0, 100.0), 8) is None
