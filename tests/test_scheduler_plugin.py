"""The scheduler plugin acting on real runs (a small random BERT on real data): each action kind
changes the running Trainer or loader, decisions made on rank 0 reach every rank, the Q-table
survives a checkpoint and a killed run, an out-of-memory step backs the batch off, bad options
are one-line errors; the signals and the LR rules against hand-computed values."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dsframe import Plugin, registry
from dsframe.config import validate
from dsframe.errors import ConfigError
from dsframe.runner import Runner
from dsframe.task import lr_scale_for
from dsframe_scheduler.plugin import SchedulerConfig, SchedulerPlugin
from dsframe_scheduler.agent import ACTIONS, QLearner, StateBins, n_states
from dsframe_scheduler.signals import GradientNoiseScale, LocalMonitor, comm_latency_ms

from .conftest import run_cli

# 128 samples in batches of 16: 8 steps an epoch
TINY = ("recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1",
        "++recipe.stages.finetune.test=false", "plugins=[scheduler]", "plugins.scheduler.max_batch=32",
        "plugins.scheduler.every_n_steps=2", "plugins.scheduler.min_steps_between=2")


def _stage(compose, tmp_path, *overrides, plugins="scheduler"):
    cfg = compose(*TINY, f"+recipe.stages.finetune.plugins=[{plugins}]", *overrides)
    Runner(validate(cfg), tmp_path).run()
    return tmp_path / "finetune"


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _scheduler_state(stage):
    ckpt = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("SchedulerPlugin")]
    return ckpt, state


# -- one test per action kind ------------------------------------------------------------------
@pytest.mark.parametrize("action,size", [("batch_up", 32), ("batch_down", 8)])
def test_batch_actions_resize_the_running_loader_mid_epoch(compose, tmp_path, action, size):
    stage = _stage(compose, tmp_path, f"plugins.scheduler.forced_actions=[{action}]", "plugins.scheduler.every_n_steps=3",
                   "plugins.scheduler.learn=false")  # after the forced action: greedy on equal values = keep
    steps = _csv(stage / "scheduler_steps.csv")
    sizes = [int(r["batch_size"]) for r in steps]  # as trained: the batches' real length
    assert sizes[:3] == [16, 16, 16] and set(sizes[3:-1]) == {size}
    decision = _csv(stage / "decisions.csv")[0]
    assert (decision["step"], decision["action"], decision["how"], decision["applied"]) == ("3", action, "forced", "batch")
    ckpt, _ = _scheduler_state(stage)
    assert ckpt["dsframe_progress"]["samples_seen"] == 128  # one whole epoch, at whatever sizes
    assert ckpt["dsframe_progress"]["lr_scale"] == pytest.approx(math.sqrt(size / 16))  # lr_rule: sqrt
    assert ckpt["global_step"] == len(steps) == 3 + math.ceil(80 / size)  # the epoch ended with the data


def test_precision_actions_switch_the_trainer_both_ways(compose, tmp_path):
    stage = _stage(compose, tmp_path, "plugins.scheduler.forced_actions=[precision_low,precision_full]",
                   "plugins.scheduler.learn=false")
    precision = {int(r["step"]): r["precision"] for r in _csv(stage / "scheduler_steps.csv")}
    assert [precision[s] for s in (1, 2, 3, 4, 5, 6)] == ["32-true"] * 2 + ["bf16-mixed"] * 2 + ["32-true"] * 2
    ledger = json.loads((stage / "segments.json").read_text())
    assert [(s["start_step"], s["trainer"]["precision"]) for s in ledger] == [(2, "bf16-mixed"), (4, "32-true")]
    assert sorted(precision) == list(range(1, 9))  # global step continuous over the segments


@pytest.mark.slow
def test_worker_actions_fork_a_second_rank_and_go_back(compose, tmp_path):
    stage = _stage(compose, tmp_path, "plugins.scheduler.max_workers=2",
                   "plugins.scheduler.forced_actions=[workers_up,workers_down]", "plugins.scheduler.learn=false")
    rows = _csv(stage / "scheduler_steps.csv")
    workers = {int(r["step"]): int(r["workers"]) for r in rows}
    assert [workers[s] for s in range(1, 7)] == [1, 1, 2, 2, 1, 1]
    assert {int(r["global_batch"]) for r in rows if r["workers"] == "2"} == {32}  # per-worker batch kept
    ckpt, state = _scheduler_state(stage)
    assert ckpt["dsframe_progress"]["samples_seen"] == 128 and ckpt["global_step"] == 6  # 2 of 16, 2 of 32, 2 of 16
    assert [r["action"] for r in state["rows"][:2]] == ["workers_up", "workers_down"]


# -- broadcast ---------------------------------------------------------------------------------
class BatchLog(Plugin):
    """Writes the batch size each rank trains on at each step."""

    name = "batchlog"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.context.stage_dir / f"batches-{trainer.global_rank}.txt", "a") as f:
            f.write(f"{trainer.global_step} {batch['labels'].shape[0]}\n")


@pytest.mark.slow
def test_two_forked_ranks_apply_rank_zeros_random_decisions_alike(compose, tmp_path):
    registry.plugins.register("batchlog", BatchLog)
    try:
        stage = _stage(compose, tmp_path, "trainer.devices=2", "plugins.scheduler.min_workers=2",
                       "plugins.scheduler.max_workers=2", "plugins.scheduler.precisions=[32-true]",
                       "plugins.scheduler.every_n_steps=1", "plugins.scheduler.min_steps_between=0",
                       "plugins.scheduler.eps_start=1.0", "plugins.scheduler.eps_end=1.0",
                       "plugins.scheduler.min_batch=2", "plugins.scheduler.seed=1", "trainer.max_epochs=2",
                       plugins="scheduler,batchlog")
    finally:
        registry.plugins._extra.pop("batchlog", None)
    ranks = [(stage / f"batches-{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank trained each step at the same size
    assert len({line.split()[1] for line in ranks[0] if line}) >= 2  # and the size did change
    actions = {r["action"] for r in _csv(stage / "decisions.csv")}
    assert actions <= {"keep", "batch_up", "batch_down"} and actions - {"keep"}


# -- Q-table persistence -----------------------------------------------------------------------
def _plugin(**options):
    return SchedulerPlugin(SchedulerConfig(max_batch=32, **options))


def test_q_table_round_trips_through_a_weights_only_checkpoint(tmp_path):
    a = _plugin()
    a.learner.update(5, 1, 2.0, 6, None)
    for _ in range(7):
        a.learner.choose(5, None)
    a.rows, a.last_change_step, a.base_batch = [{"step": 4, "action": "batch_up"}], 4, 16
    torch.save({"callbacks": {"s": a.state_dict()}}, tmp_path / "c.ckpt")
    b = _plugin()
    b.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]["s"])
    assert np.array_equal(a.learner.q, b.learner.q) and b.learner.decisions == 7
    assert b.learner.epsilon == a.learner.epsilon < 0.3
    assert b.learner.choose(5, None) == a.learner.choose(5, None)  # the exploration RNG continues too
    assert (b.rows, b.last_change_step, b.base_batch) == (a.rows, 4, 16)


def test_policy_file_starts_the_agent(tmp_path):
    bins = StateBins()
    trained = QLearner(n_states(bins), bins=bins, eps_decay_decisions=10)
    trained.q[:, ACTIONS.index("batch_up")] = 3.0
    trained.decisions = 50
    trained.save(tmp_path / "policy.json")
    plugin = _plugin(policy=str(tmp_path / "policy.json"))
    assert np.array_equal(plugin.learner.q, trained.q) and plugin.learner.epsilon == pytest.approx(0.05)


def test_chained_moves_apply_at_one_decision(compose, tmp_path):
    bins = StateBins()
    trained = QLearner(n_states(bins), bins=bins)
    trained.q[:, ACTIONS.index("batch_up")] = 3.0          # greedy: grow the batch while it can
    trained.save(tmp_path / "policy.json")
    stage = _stage(compose, tmp_path, f"plugins.scheduler.policy={tmp_path / 'policy.json'}",
                   "plugins.scheduler.learn=false", "plugins.scheduler.max_batch=64", "plugins.scheduler.max_moves=2",
                   "plugins.scheduler.every_n_steps=2", "plugins.scheduler.min_steps_between=100")
    first = _csv(stage / "decisions.csv")[0]
    assert (first["action"], first["batch_size"], first["new_batch_size"], first["applied"]) == \
        ("batch_up+batch_up", "16", "64", "batch")
    sizes = [int(r["batch_size"]) for r in _csv(stage / "scheduler_steps.csv")]
    assert sizes[:2] == [16, 16] and sizes[2] == 64


def test_policy_file_sets_the_reward_form_and_refuses_another(tmp_path):
    bins = StateBins()
    trained = QLearner(n_states(bins), bins=bins)
    trained.reward_form = "cost"                 # what the benchmark trains with
    trained.save(tmp_path / "policy.json")
    assert json.loads((tmp_path / "policy.json").read_text())["reward_form"] == "cost"
    assert _plugin(policy=str(tmp_path / "policy.json")).reward_form == "cost"            # default: the file's
    assert _plugin(policy=str(tmp_path / "policy.json"), reward_form="cost").reward_form == "cost"
    with pytest.raises(ConfigError, match=r"plugins.scheduler.reward_form='rate' is not allowed: cost \(the form "
                                          r"policy file .*policy.json was trained with\), or null"):
        _plugin(policy=str(tmp_path / "policy.json"), reward_form="rate")
    assert _plugin().reward_form == "rate"                                              # no policy: rate
    # a file without a recorded form (version 1) is taken as it is
    trained.reward_form = None
    trained.save(tmp_path / "old.json")
    assert _plugin(policy=str(tmp_path / "old.json"), reward_form="cost").reward_form == "cost"


@pytest.mark.slow
def test_killed_run_resumes_with_its_q_table_and_setting(tmp_path):
    args = [*TINY, "+recipe.stages.finetune.plugins=[scheduler]",
            "plugins.scheduler.forced_actions=[precision_low]", "plugins.scheduler.eps_start=1.0",
            "plugins.scheduler.eps_end=1.0", "plugins.scheduler.precisions=[32-true,bf16-mixed]",
            f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsframe", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seg = tmp_path / "finetune" / "checkpoints" / "segment.ckpt"
    while proc.poll() is None and not seg.exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    saved = torch.load(seg, map_location="cpu", weights_only=True)
    (before,) = [v for k, v in saved["callbacks"].items() if k.startswith("SchedulerPlugin")]

    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    stage = tmp_path / "finetune"
    ckpt, after = _scheduler_state(stage)
    n = len(before["rows"])
    assert after["rows"][:n] == before["rows"]  # the record from before the kill, once
    assert n >= 1 and before["rows"][0]["action"] == "precision_low"
    assert after["learner"]["decisions"] > before["learner"]["decisions"]  # counters went on
    assert after["learner"]["updates"] > before["learner"]["updates"]
    assert after["base_batch"] == before["base_batch"] == 16
    steps = [int(r["step"]) for r in _csv(stage / "scheduler_steps.csv")]
    assert steps == list(range(1, ckpt["global_step"] + 1))  # continuous, none twice
    assert ckpt["dsframe_progress"]["samples_seen"] == 128  # the epoch, at the sizes the agent chose
    assert _csv(stage / "scheduler_steps.csv")[2]["precision"] == "bf16-mixed"  # the forced switch held


# -- out of memory -----------------------------------------------------------------------------
class FakeOOM(Plugin):
    """Raises an out-of-memory error at the first step whose batch is larger than 8."""

    name = "fakeoom"
    raised = 0

    def loss(self, task, batch, outputs, loss):
        if batch["labels"].shape[0] > 8 and task.trainer.global_step == 3 and not FakeOOM.raised:
            FakeOOM.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return None


def test_out_of_memory_backs_the_batch_off_and_training_goes_on(compose, tmp_path):
    registry.plugins.register("fakeoom", FakeOOM)
    FakeOOM.raised = 0
    try:
        stage = _stage(compose, tmp_path, "plugins.scheduler.every_n_steps=100", plugins="scheduler,fakeoom")
    finally:
        registry.plugins._extra.pop("fakeoom", None)
    assert FakeOOM.raised == 1
    (row,) = _csv(stage / "decisions.csv")
    assert (row["action"], row["batch_size"], row["new_batch_size"]) == ("oom_backoff", "16", "8")
    steps = _csv(stage / "scheduler_steps.csv")
    assert [int(r["batch_size"]) for r in steps] == [16, 16, 16] + [8] * 8  # 48 + 16 dropped + 64 = 128
    ckpt, _ = _scheduler_state(stage)
    # Lightning still steps the optimizer (no gradients: nothing changes) for the dropped batch
    assert ckpt["global_step"] == 12 and ckpt["dsframe_progress"]["samples_seen"] == 128 - 16


class FakeOOMOnRankOne(Plugin):
    """Raises an out-of-memory error on rank 1 only, at step 1 (once per run: a marker file)."""

    name = "fakeoom_rank1"

    def loss(self, task, batch, outputs, loss):
        marker = self.context.stage_dir / "oom-raised"
        if task.trainer.global_rank == 1 and task.trainer.global_step == 1 and not marker.exists():
            marker.write_text("1")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return None


@pytest.mark.slow
def test_out_of_memory_on_one_ddp_rank_backs_off_every_rank_alike(compose, tmp_path):
    registry.plugins.register("fakeoom_rank1", FakeOOMOnRankOne)
    registry.plugins.register("batchlog", BatchLog)
    try:
        stage = _stage(compose, tmp_path, "trainer.devices=2", "plugins.scheduler.min_workers=2",
                       "plugins.scheduler.max_workers=2", "plugins.scheduler.every_n_steps=100",
                       plugins="scheduler,fakeoom_rank1,batchlog")
    finally:
        registry.plugins._extra.pop("fakeoom_rank1", None)
        registry.plugins._extra.pop("batchlog", None)
    assert (stage / "oom-raised").exists()
    (row,) = _csv(stage / "decisions.csv")
    assert (row["action"], row["batch_size"], row["new_batch_size"], row["workers"]) == ("oom_backoff", "16", "8", "2")
    ranks = [(stage / f"batches-{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert ranks[0] == ranks[1]  # both ranks backed off at the same step
    assert [line.split()[1] for line in ranks[0] if line] == ["16", "16"] + ["8"] * 4
    ckpt, _ = _scheduler_state(stage)
    # step 0 at 2x16, step 1 dropped on both ranks (32 samples), 64 samples left at 2x8: 4 steps
    assert ckpt["global_step"] == 6 and ckpt["dsframe_progress"]["samples_seen"] == 128 - 32


# -- config --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("override,expected", [
    ("plugins.scheduler.lr_rule=cubic", "plugins.scheduler.lr_rule='cubic' is not allowed: one of none, linear, sqrt, adascale"),
    ("plugins.scheduler.max_batch=null", "plugins.scheduler.max_batch=None is not allowed: an integer >= min_batch (4): required on a CPU"),
])
def test_bad_option_is_one_line_error(tmp_path, override, expected):
    out = run_cli("recipe=sentiment", "debug=tiny", "plugins=[scheduler]", "plugins.scheduler.max_batch=32",
                  "+recipe.stages.finetune.plugins=[scheduler]", override, cwd=tmp_path)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], out.stderr


def test_config_checks_guard_rails():
    with pytest.raises(ConfigError, match="plugins.scheduler.precisions"):
        SchedulerConfig(max_batch=8, precisions=["8-bit"])
    with pytest.raises(ConfigError, match="plugins.scheduler.forced_actions"):
        SchedulerConfig(max_batch=8, forced_actions=["teleport"])
    with pytest.raises(ConfigError, match="plugins.scheduler.max_batch"):
        SchedulerConfig(min_batch=16, max_batch=8)


# -- signals and LR rules -------------------------------------------------------------------------
def test_lr_rules_against_hand_computed_values():
    assert lr_scale_for("linear", 64, 16) == 4.0
    assert lr_scale_for("sqrt", 64, 16) == 2.0
    assert lr_scale_for("none", 64, 16) == 1.0
    # AdaScale gain with B_noise = 48: 64·(48+16) / (16·(48+64)) = 4096/1792
    assert lr_scale_for("adascale", 64, 16, noise_scale=48) == pytest.approx(4096 / 1792)
    assert lr_scale_for("adascale", 64, 16) == 2.0  # no estimate: sqrt


def test_cpu_monitor_reads_this_process():
    monitor = LocalMonitor(torch.device("cpu"))
    x = torch.randn(400, 400)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.3:
        x = x @ x.T / 400
    busy = monitor.utilisation()
    assert 0.0 < busy <= 1.0 and 0.0 < monitor.free_memory() <= 1.0
    assert comm_latency_ms() == 0.0  # one process


def test_noise_scale_recovers_a_known_gradient_noise():
    # g = G + ξ/√B with |G|² = 4, tr(Σ) = 400 (per-sample variance 1 over 400 coordinates): B_noise = 100
    gen = torch.Generator().manual_seed(0)
    G = torch.zeros(400)
    G[:4] = 1.0
    est = GradientNoiseScale(beta=0.05)
    for _ in range(600):
        est.update([G + torch.randn(400, generator=gen) / math.sqrt(16)], batch=16)
    assert est.value == pytest.approx(100.0, rel=0.25)
    est.update([G], batch=32)  # a new batch size restarts the statistics
    assert est.value == 0.0


# -- profile --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_profile_stage_writes_a_trace_the_simulator_reads(compose, tmp_path):
    from dsframe_scheduler.simulator import read_trace

    cfg = compose("recipe=scheduler_profile", "debug=tiny", "recipe.stages.profile.options.batch_sizes=[4,8]",
                  "recipe.stages.profile.options.workers=[1]", "recipe.stages.profile.options.steps=2",
                  "recipe.stages.profile.options.validation_batches=[4,8]",
                  "recipe.stages.profile.options.validation_samples=32",
                  "recipe.stages.profile.options.validation_every=16", "+recipe.stages.profile.options.val_batches=1")
    Runner(validate(cfg), tmp_path).run()
    trace = read_trace(tmp_path / "profile" / "trace")
    assert sorted(trace.local_bsz.tolist()) == [4, 4, 8, 8] and sorted(set(trace.precision)) == ["32-true", "bf16-mixed"]
    assert (trace.step_time > 0).all() and (trace.sync_time == 0).all()  # one worker: no all-reduce
    assert sorted(trace.validation) == [4, 8]
    v8 = trace.validation[8]
    assert v8["progress"].tolist() == [4.0, 8.0] and v8["iteration"].tolist() == [2.0, 4.0]  # in steps of B0 = 4
    assert ((0 <= v8["metric"]) & (v8["metric"] <= 1)).all() and (v8["grad_sqr"] > 0).all()
