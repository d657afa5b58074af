"""The online goodput advisor (the state's advice component in a running job): its step-time
model from a trace and from the job's own measurements, the same advice as the simulator's
advisor on the same model, the plugin filling and logging the advice in a real fit, one-line
errors for bad options."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsframe.config import validate
from dsframe.errors import ConfigError
from dsframe.runner import Runner
from dsframe_scheduler.plugin import SchedulerConfig, SchedulerPlugin
from dsframe_scheduler.advisor import OnlineAdvisor, StepTimeModel, load_trace_workload
from dsframe_scheduler.agent import ACTIONS, Limits, Setting, allowed_actions
from dsframe_scheduler.policies import GoodputAdvisor
from dsframe_scheduler.simulator import ClusterSim

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "benchmarks" / "results" / "scheduler_profile"     # this CPU's MiniLM trace


def test_trace_advisor_advises_what_the_simulators_advisor_does():
    """The plugin's advisor on a trace (advisor=trace) against the simulator's on the same
    workload: the same move from every setting, noise scale and point of the job."""
    w = load_trace_workload(PROFILE)
    lam = 1.0
    online = OnlineAdvisor(StepTimeModel(w.limits, w.init_batch, prior=w, mode="trace", fits=w.fits), lam,
                           smoothing=0.0)
    sim = ClusterSim(w, noise=False)
    reference = GoodputAdvisor(smoothing=0.0)
    reference.reset(sim, lam)
    moves = []
    for noise in (1.0, 8.0, 64.0, 1e4):
        reference.update(noise)
        online.update(noise)
        for k in (0, w.spec.decisions - 1):          # the whole job ahead, the last chunk
            sim.k = k
            for s in w.settings():
                ref = reference.advice(sim, allowed_actions(s, w.limits), s)
                got, goal = online.advise(s, sim.bounds[-1] - sim.progress)
                assert (got, goal) == (ref, reference.target(sim, s)), (noise, k, s)
                moves.append(ACTIONS[got])
    # not vacuous: on this trace the advisor moves both ways, and keeps near the end
    assert {"batch_up", "batch_down", "keep"} <= set(moves)


def test_measured_step_times_predict_untried_settings():
    limits = Limits(min_batch=8, max_batch=64, precisions=("32-true", "bf16-mixed"), min_workers=1, max_workers=1)
    model = StepTimeModel(limits, init_batch=16)
    for b in (8, 16):                              # the job measured 0.1 + 0.01·b s at two batches
        for _ in range(2):
            model.observe(Setting(b), 0.1 + 0.01 * b)
    assert model.step_time(Setting(16)) == pytest.approx(0.26)          # visited: its median
    assert model.step_time(Setting(64)) == pytest.approx(0.74)          # untried: the fitted a + c·b
    assert np.isnan(model.step_time(Setting(16, "bf16-mixed")))         # no measurement, no trace: unknown
    model.current = Setting(16)
    assert {(s.batch_size, s.precision) for s in model.settings()} >= {(64, "32-true"), (16, "bf16-mixed")}
    advisor = OnlineAdvisor(model, lam=0.0, smoothing=0.0)
    assert advisor.advise(Setting(16), remaining=1e6) == (0, Setting(16))   # the noise scale unknown: keep
    advisor.update(1e6)                            # all noise: a larger batch is as good as more steps
    assert advisor.advise(Setting(16), remaining=1e6) == (ACTIONS.index("batch_up"), Setting(64))
    advisor.update(1.0)                            # almost no noise: the smallest, cheapest steps
    assert advisor.advise(Setting(16), remaining=1e6) == (ACTIONS.index("batch_down"), Setting(8))

    # a trace gives the form where the job measured too little; measurements set its level
    w = load_trace_workload(PROFILE)
    traced = StepTimeModel(limits, init_batch=16, prior=w)
    s, t = Setting(16, "bf16-mixed"), Setting(32, "bf16-mixed")
    assert traced.step_time(t) == pytest.approx(w.step_time(t))         # nothing measured: the trace
    traced.observe(s, 2 * w.step_time(s))
    traced.observe(s, 2 * w.step_time(s))
    assert traced.step_time(t) == pytest.approx(2 * w.step_time(t))     # the measured/trace ratio
    assert traced.step_time(Setting(32)) == pytest.approx(2 * w.step_time(Setting(32)))   # any precision
    traced.load_state_dict(json.loads(json.dumps(traced.state_dict())))  # survives a checkpoint as is
    assert traced.step_time(t) == pytest.approx(2 * w.step_time(t))


@pytest.mark.parametrize("overrides,message", [
    (["advisor=maybe"], "plugins.scheduler.advisor='maybe' is not allowed: one of auto, off, trace"),
    (["advisor=trace"], "plugins.scheduler.advisor_trace=None is not allowed: a trace folder: advisor=trace"),
    (["advisor_trace=/no/such/trace"], "plugins.scheduler.advisor_trace='/no/such/trace' is not allowed: "
                                       "a trace folder with placements.csv"),
    (["advisor=trace", f"advisor_trace={PROFILE}", "+bins.advice=false"],
     "plugins.scheduler.advisor='trace' is not allowed: auto or off: the state has no advice component"),
])
def test_bad_advisor_options_are_one_line_errors(compose, overrides, message):
    cfg = compose("recipe=sentiment", "debug=tiny", "plugins=[scheduler]", "plugins.scheduler.max_batch=32",
                  "+recipe.stages.finetune.plugins=[scheduler]", *[o.replace("+", "+plugins.scheduler.") if o[0] == "+"
                                                                    else f"plugins.scheduler.{o}" for o in overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_advisor_trace_is_a_one_line_error(tmp_path):
    (tmp_path / "placements.csv").write_text("placement,local_bsz\n1,8\n")
    with pytest.raises(ConfigError) as err:
        SchedulerPlugin(SchedulerConfig(max_batch=32, advisor_trace=str(tmp_path)))
    assert str(err.value).startswith(f"plugins.scheduler.advisor_trace='{tmp_path}' is not allowed: a readable "
                                     "trace folder") and "\n" not in str(err.value)


def _flat_trace(folder: Path) -> Path:
    """A one-worker fp32 trace whose step time does not depend on the batch: a larger batch
    pays as soon as the gradient has any noise."""
    folder.mkdir()
    rows = ["placement,local_bsz,step_time,sync_time"] + [f"1,{b},0.05,0.0" for b in (8, 16, 32)]
    (folder / "placements.csv").write_text("\n".join(rows) + "\n")
    (folder / "validation-16.csv").write_text("progress,iteration,metric,grad_sqr,grad_var\n"
                                              "1.0,1,0.5,1.0,4.0\n2.0,2,0.6,1.0,4.0\n")
    return folder


def test_running_job_fills_and_logs_the_advice(compose, tmp_path):
    """A real fit (tiny BERT, 12 steps at batch 8, a decision every 2 steps) on a Q-table that
    always keeps: once the noise scale is measured (10 steps), the advisor on a trace where the
    batch is free says batch_up, and keep at the last decision (nothing left to gain); the
    advice is in the state and in decisions.csv, the job's step times in the checkpoint."""
    trace = _flat_trace(tmp_path / "trace")
    # threads=1: on a shared 2-core machine two threads per step wait on each other (3x slower)
    cfg = compose("recipe=sentiment", "debug=tiny", "threads=1", "data.batch_size=8", "data.max_train_samples=96",
                  "data.max_length=16", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=0",
                  "++recipe.stages.finetune.test=false", "plugins=[scheduler]",
                  "+recipe.stages.finetune.plugins=[scheduler]", "plugins.scheduler.max_batch=16",
                  "plugins.scheduler.every_n_steps=2", "plugins.scheduler.learn=false",
                  "plugins.scheduler.warm_start=false",            # a table of zeros: greedy keep
                  "plugins.scheduler.advisor=trace", f"plugins.scheduler.advisor_trace={trace}",
                  "plugins.scheduler.precisions=[32-true]",
                  # few buckets: a small Q-table (the default's 423k values take seconds to checkpoint)
                  *[f"+plugins.scheduler.bins.{k}={v}" for k, v in (("utilisation", "[0.5]"), ("free_memory", "[0.1]"),
                    ("comm_latency_ms", "[1.0]"), ("noise_ratio", "[1.0]"), ("batch_buckets", 2), ("worker_buckets", 1))])
    threads = torch.get_num_threads()
    try:
        Runner(validate(cfg), tmp_path / "run").run()
    finally:
        torch.set_num_threads(threads)
    stage = tmp_path / "run" / "finetune"
    with open(stage / "decisions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4", "6", "8", "10", "12"] and {r["action"] for r in rows} == {"keep"}
    assert [float(r["noise_scale"]) > 0 for r in rows] == [False] * 4 + [True] * 2   # measured from the 10th step
    assert [(r["advice"], r["advice_goal"]) for r in rows] == [("keep", "8/32-true/1")] * 4 + \
        [("batch_up", "16/32-true/1"), ("keep", "8/32-true/1")]      # the last: the job is done
    assert rows[4]["state_view"].split("/")[-1] == str(ACTIONS.index("batch_up"))   # the advice is in the state
    ckpt = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("SchedulerPlugin")]
    (sample,) = state["advisor"]["model"]["samples"]          # the job's own step times, at its one setting
    assert sample[:3] == [8, "32-true", 1] and len(sample[3]) == 11 and min(sample[3]) > 0   # the 1st: warm-up
    assert state["advisor"]["b_noise"] > 0
