"""Injected faults on real processes (``python -m dsframe`` in its own process group): signals
and kills of a single-process fit, of one rank and of the whole group of a 2-rank DDP run and of
a tensor-parallel (hybrid tp=2) run. After each, every process has ended, the exit status says
what happened (143 SIGTERM, 130 SIGINT, non-zero otherwise), and rerunning the same command
finishes the stage: global step continues, at most one checkpoint interval is retrained, and a
single-process run ends exactly where an uninterrupted one does (same losses, same test metrics)."""
import json
import math
import signal

import lightning.pytorch as pl
import pytest
import torch

from dsframe import faultinject
from dsframe.parallel.testing import RunSpec, run
from dsframe.resilience import StageGuard
from dsframe.resilience_config import CheckpointConfig, NonFiniteLossConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    return faultinject.install(tmp_path_factory.mktemp("faultinject"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, plugin_dir):
    """The same single-process command, never interrupted."""
    run = tmp_path_factory.mktemp("ref") / "run"
    out = faultinject.interrupt(run, plugin_dir, "single", how="", rerun=False)
    assert out.rc == 0, out.stderr_tail
    return out.stage_dir


def _same_run(stage_dir, reference):
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (stage_dir, reference))
    assert got["test"] == want["test"] and got["global_step"] == want["global_step"] == 16
    # the training log continues in place: the rows (losses per step, epoch aggregates) of one run
    assert (stage_dir / "logs/fit/metrics.csv").read_text() == (reference / "logs/fit/metrics.csv").read_text()
    assert (stage_dir / "curves.png").exists()


def test_sigterm_saves_exits_143_and_the_rerun_equals_an_uninterrupted_run(tmp_path, plugin_dir, reference):
    out = faultinject.interrupt(tmp_path / "run", plugin_dir, "single", how="SIGTERM", at_step=5)
    assert out.rc == 143, out.stderr_tail
    assert "interrupted by SIGTERM; checkpoint at step 5" in out.stderr_tail and not out.traceback
    assert out.rerun_rc == 0 and out.left_running == []
    assert out.trained == list(range(1, 17))  # nothing retrained: the checkpoint was taken at the stop
    _same_run(out.stage_dir, reference)


def test_sigint_saves_and_exits_130(tmp_path, plugin_dir):
    """Ctrl-C takes the SIGTERM path above (same handler); the rerun is left to that test and to
    benchmarks/faults.py, which reruns every fault."""
    out = faultinject.interrupt(tmp_path / "run", plugin_dir, "single", how="SIGINT", at_step=5, rerun=False)
    assert out.rc == 130 and out.left_running == [], out.stderr_tail
    assert "interrupted by SIGINT; checkpoint at step 5" in out.stderr_tail and not out.traceback
    assert (out.stage_dir / "checkpoints/step-00000005.ckpt").exists()
    assert not (out.stage_dir / "stage.json").exists()  # the stage is not finished


def test_sigkill_loses_at_most_one_interval_and_the_rerun_equals_an_uninterrupted_run(tmp_path, plugin_dir,
                                                                                       reference):
    out = faultinject.interrupt(tmp_path / "run", plugin_dir, "single", how="SIGKILL", at_step=7)
    assert out.rc == -signal.SIGKILL and out.rerun_rc == 0
    assert out.trained == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, *range(8, 17)]  # resumed from step-00000004.ckpt
    assert out.lost_steps == 3 <= out.interval
    _same_run(out.stage_dir, reference)


def test_sigterm_outside_the_fit_is_not_a_success(tmp_path, plugin_dir):
    out = faultinject.interrupt(tmp_path / "run", plugin_dir, "single", how="SIGTERM", in_finalize=True,
                                rerun=False)
    assert out.rc == 143 and "interrupted by SIGTERM outside training" in out.stderr_tail
    assert not (out.stage_dir / "stage.json").exists() and not out.traceback


@pytest.mark.parametrize("how, target, code, lost", [
    ("SIGKILL", "rank1", 1, 1),  # the peer's collective fails, the launcher ends the rest
    ("SIGKILL", "launcher", -9, 0),  # the forked ranks get SIGTERM from the kernel and save
])
def test_ddp_ranks_all_end_and_the_rerun_resumes(tmp_path, plugin_dir, how, target, code, lost):
    out = faultinject.interrupt(tmp_path / "run", plugin_dir, "ddp", how=how, target=target, at_step=3)
    assert out.left_running == [], "orphan ranks"
    assert out.rc == code, out.stderr_tail
    assert not out.traceback and out.rerun_rc == 0, out.stderr_tail
    assert out.final_step == 8 and sorted(set(out.trained)) == list(range(1, 9))
    assert out.lost_steps == lost and out.survived
    if target == "rank1":
        assert "a rank stopped (process 1 terminated with signal SIGKILL)" in out.stderr_tail


@pytest.fixture(scope="module")
def hybrid_reference(tmp_path_factory, plugin_dir):
    """The tensor-parallel command, never interrupted."""
    out = faultinject.interrupt(tmp_path_factory.mktemp("hybrid_ref") / "run", plugin_dir, "hybrid", how="",
                                rerun=False)
    assert out.rc == 0, out.stderr_tail
    return json.loads((out.stage_dir / "metrics.json").read_text())


def test_tensor_parallel_rank_sigterm_saves_a_distributed_checkpoint_and_resumes(tmp_path, plugin_dir,
                                                                                 hybrid_reference):
    out = faultinject.interrupt(tmp_path / "run", plugin_dir, "hybrid", how="SIGTERM", target="rank1", at_step=6)
    assert out.rc == 143 and out.left_running == [] and out.rerun_rc == 0, out.stderr_tail
    assert out.trained == list(range(1, 11)) and out.final_step == 10 and out.survived
    ckpts = sorted(p.name for p in (out.stage_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step-00000006.ckpt", "step-00000008.ckpt"]  # keep_last=2, DCP folders
    assert (out.stage_dir / "checkpoints/step-00000008.ckpt/.metadata").exists()
    # the data position, optimizer and LR schedule continue: the run ends where the uninterrupted one does
    assert json.loads((out.stage_dir / "metrics.json").read_text())["test"] == hybrid_reference["test"]


def test_tensor_parallel_checkpoint_resumes_under_another_layout(tmp_path, plugin_dir, hybrid_reference):
    """A tp=2 run stopped at step 6 finishes as one process: the DCP checkpoint is resharded on
    load (parameter names are the whole model's) and the result is the uninterrupted tp=2 run's."""
    out = faultinject.interrupt(tmp_path / "run", plugin_dir, "hybrid", how="SIGTERM", target="group", at_step=6,
                                rerun_overrides=("strategy.tp=1", "trainer.devices=1"))
    assert out.rc == 143 and out.rerun_rc == 0 and out.left_running == [], out.stderr_tail
    assert out.final_step == 10 and out.trained == list(range(1, 11))
    got = json.loads((out.stage_dir / "metrics.json").read_text())["test"]
    assert got.keys() == hybrid_reference["test"].keys()
    for key, want in hybrid_reference["test"].items():
        assert abs(got[key] - want) <= 1e-4 * max(1.0, abs(want)), (key, got[key], want)


class _NaNActivationsAt(pl.Callback):
    """Every Linear layer of this rank outputs NaN during one step (all of a pipeline's stages)."""

    def __init__(self, step: int):
        self.step, self.handles = step, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.handles = [m.register_forward_hook(lambda _m, _i, out: out * float("nan"))
                            for m in pl_module.modules() if isinstance(m, torch.nn.Linear)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for h in self.handles:
            h.remove()
        self.handles = []


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_policy_holds_under_a_pipeline(tmp_path, policy):
    """pp=2: the loss exists on the last stage only; the strategy broadcasts it, so every rank
    stops (stop) or drops that update (skip: without the check the NaN gradients would be applied
    and every weight would end NaN)."""
    guard = StageGuard(tmp_path / "stage", "fit", 0, CheckpointConfig(every_minutes=None),
                       NonFiniteLossConfig(policy=policy, max_skips=1))
    spec = RunSpec(layout=dict(pp=2, micro_batches=2), steps=5)
    out = str(tmp_path / "r.pt")
    if policy == "stop":
        with pytest.raises(Exception, match="training loss is nan at step 2"):
            run(spec, out, callbacks=[_NaNActivationsAt(2), guard])
        return
    result = run(spec, out, callbacks=[_NaNActivationsAt(2), guard])
    losses = result["losses"]
    assert len(losses) == 5 and math.isnan(losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)
    assert all(bool(torch.isfinite(v).all()) for v in result["params"].values())
