"""Beyond one box, on loopback: two torchrun agents ("nodes") with dp across them and tp inside
each; one node lost ends the other within the collective timeout; SLURM's environment detected."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from dsframe.parallel.testing import max_abs_diff

LM = ["recipe=lm_hybrid_parallel", "debug=lm_fast", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
      "hydra.run.dir=run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("HYDRA_FULL_ERROR", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(cwd, nproc: int, *overrides):
    """Two torchrun agents, each its own process group (a node), joined by a c10d rendezvous."""
    port = free_port()
    common = ["--nnodes=2", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              f"--rdzv-id=t{port}", "-m", "dsframe", *LM, f"trainer.devices={nproc}", "trainer.num_nodes=2", *overrides]
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--node-rank={k}", *common], cwd=cwd,
                             env=ENV, stdout=open(cwd / f"node{k}.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True) for k in (0, 1)]


def kill_node(proc) -> None:
    """What losing a machine does: the agent and its workers die at once (torchrun starts each
    worker in a session of its own, so the agent's process group alone would leave them running)."""
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in workers:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stop(procs):
    for p in procs:
        if p.poll() is None:
            kill_node(p)


def weights(run_dir):
    return torch.load(run_dir / "train" / "model.pt", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_two_torchrun_nodes_dp_across_tp_inside_match_one_process(tmp_path):
    (tmp_path / "nodes").mkdir()
    (tmp_path / "one").mkdir()
    steps = ["trainer.max_steps=4", "trainer.val_check_interval=4"]
    procs = two_nodes(tmp_path / "nodes", 2, "strategy.dp=2", "strategy.tp=2", "strategy.pp=1",
                      "strategy.hierarchical_allreduce=true", *steps)
    try:
        rcs = [p.wait(timeout=240) for p in procs]
    finally:
        stop(procs)
    log = (tmp_path / "nodes" / "node0.log").read_text() + (tmp_path / "nodes" / "node1.log").read_text()
    assert rcs == [0, 0], log[-3000:]
    assert "TorchElasticEnvironment (ranks started externally), 2 node(s) x 2 process(es)" in log
    # the same training in one process: per-rank batch 16 x dp 2 = 32
    one = subprocess.run([sys.executable, "-m", "dsframe", *LM, "strategy=auto", *[f"~strategy.{k}" for k in (
        "dp", "tp", "pp", "micro_batches", "schedule")], "trainer.devices=1", "data.batch_size=32", *steps],
        cwd=tmp_path / "one", env=ENV, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = weights(tmp_path / "nodes" / "run"), weights(tmp_path / "one" / "run")
    live = [k for k in a if not k.endswith("attn.k.bias")]      # Adam's null-space (docs/parallel.md)
    assert max_abs_diff({k: a[k] for k in live}, {k: b[k] for k in live}) <= 1e-4
    assert max_abs_diff(a, {k: torch.zeros_like(v) for k, v in a.items()}) > 0
    test = [json_metrics(tmp_path / d / "run")["test"]["test/loss"] for d in ("nodes", "one")]
    assert abs(test[0] - test[1]) <= 1e-4


def json_metrics(run_dir):
    import json
    return json.loads((run_dir / "metrics.json").read_text())["train"]


@pytest.mark.slow
def test_losing_a_node_ends_the_other_within_the_timeout_and_the_rerun_resumes(tmp_path):
    timeout_s = 10
    overrides = ("strategy.dp=2", "strategy.tp=1", "strategy.pp=1", "trainer.max_steps=24", "trainer.max_epochs=100",
                 "trainer.val_check_interval=10", f"strategy.timeout_s={timeout_s}", "checkpoint.every_n_steps=4")
    procs = two_nodes(tmp_path, 1, *overrides)
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    ckpts = tmp_path / "run" / "train" / "checkpoints"
    try:
        t0 = time.time()
        while not list(ckpts.glob("step-*.ckpt")):               # the first interval checkpoint (step 4)
            assert time.time() - t0 < 240 and procs[0].poll() is None, logs[0].read_text()[-3000:]
            time.sleep(0.1)
        assert procs[0].poll() is None and procs[1].poll() is None
        kill_node(procs[1])                                      # node 1 is lost: its agent and workers
        killed = time.time()
        rc = procs[0].wait(timeout=timeout_s + 60)
        took = time.time() - killed
    finally:
        stop(procs)
    assert rc != 0
    # the survivor's next collective fails: at once when the lost peer's sockets are reset (a killed
    # process on a reachable host, as here), after strategy.timeout_s when nothing answers (a machine
    # gone); the agent then tears down in a few seconds
    assert took <= timeout_s + 30, took
    log = logs[0].read_text()
    assert re.search(rf"Connection (reset|closed) by peer|Timed out waiting {timeout_s * 1000}ms", log), log[-3000:]
    print(f"node 0 ended {took:.1f} s after node 1 was killed")

    # the same command again, on both nodes: the stage resumes from the last interval checkpoint
    procs = two_nodes(tmp_path, 1, *overrides)
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        stop(procs)
    assert rcs == [0, 0], logs[0].read_text()[-3000:]
    resumed = [int(m) for f in logs for m in re.findall(r"stage train: resuming from \S+ \(step (\d+)\)", f.read_text())]
    assert resumed and min(resumed) >= 4, [f.read_text()[-2000:] for f in logs]
    assert json.loads((tmp_path / "run" / "train" / "metrics.json").read_text())["global_step"] == 24


SLURM_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from dsframe.parallel.testing import RunSpec, run
r = run(RunSpec(layout=dict(tp=2), timeout_s=60), sys.argv[1])
if r:
    torch.save(r, sys.argv[1])
"""


@pytest.mark.slow
def test_slurm_environment_launch(tmp_path):
    """Two tasks started as srun would (SLURM_* variables, no torchrun): Lightning's SLURMEnvironment
    gives the ranks, and tp=2 trains like one process."""
    from dsframe.parallel.testing import RunSpec, run

    script = tmp_path / "train.py"
    script.write_text(SLURM_SCRIPT)
    out = tmp_path / "r.pt"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dsframe", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1",
             "SLURM_JOB_NUM_NODES": "1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**ENV, **slurm, "SLURM_PROCID": str(k), "SLURM_LOCALID": str(k)})
             for k in (0, 1)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        stop(procs)
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:]
    assert "SLURMEnvironment (ranks started externally), 1 node(s) x 2 process(es)" in logs[0]
    ref = run(RunSpec(), str(tmp_path / "ref.pt"))
    res = torch.load(out, weights_only=True)
    assert max_abs_diff(res["params"], ref["params"]) <= 1e-5
    assert max_abs_diff(res["parent_params"], res["params"]) == 0.0   # whole model on the rank after fit
