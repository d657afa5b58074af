"""scheduler: a Q-learning agent that changes the running job's batch size, precision and worker
count (see docs/scheduler.md).

Every ``every_n_steps`` optimizer steps rank 0 reads the signals (utilisation, free memory, comm
latency, gradient noise scale), encodes the state, rewards the previous decision with the
training progress it bought per unit of cost J = worker·s + λ·s (restart time charged), updates
the Q-table and picks an action (ε-greedy among the actions the guard rails allow, with
hysteresis and a cooldown). The decision is broadcast and every rank applies it: a batch change
in place, mid-epoch; a precision or worker change by ending the stage's segment so the runner
continues it in a new Trainer. The Q-table, ε, counters and the record live in the Lightning
checkpoint; ``policy=PATH`` starts from a trained Q-table (e.g. learned in the simulator).
When the state has an advice component (``bins.advice``), each decision's advice is the goodput
advisor's next move, predicted from the step times the job measures and/or a trace
(``advisor``, ``advisor_trace``; :mod:`dsframe_scheduler.advisor`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import ClassVar, Optional

import torch

from dsframe.batch import batch_size
from dsframe.errors import ConfigError
from dsframe.plugin import Plugin
from dsframe_scheduler.agent import (ACTIONS, QLearner, Setting, Signals, StateBins, allowed_actions,
                                     conservative_heuristic, decode_state,
                                     encode_state, n_states, next_setting, reward)
from dsframe_scheduler.config import SchedulerConfig

log = logging.getLogger("dsframe.scheduler")
__all__ = ["SchedulerPlugin", "SchedulerConfig"]


class SchedulerPlugin(Plugin):
    name: ClassVar[str] = "scheduler"
    description: ClassVar[str] = SchedulerConfig.description
    Config: ClassVar[type] = SchedulerConfig

    def __init__(self, config: SchedulerConfig, context=None):
        super().__init__(config, context)
        self.bins = StateBins.from_dict(dict(config.bins))
        self.reward_form = config.reward_form or "rate"
        self.learner = self._make_learner()
        self.base_batch = 0               # global batch the LR was tuned at (the first segment's)
        self.last_decision_step = 0
        self.last_change_step = -10**9
        self.forced_done = 0
        self.pending: Optional[dict] = None   # the last decision, waiting for its reward
        self.scale = 0.0                  # progress per cost of the first interval: rewards near 1
        self.switch_at: Optional[float] = None
        self.restart_s = 0.0
        self.rows: list[dict] = []        # decisions
        self.steps: list[dict] = []       # per-step setting and loss
        self._monitor = None
        self._noise = None
        self._oom = False
        # the goodput advisor (the state's advice component): built at the first train start,
        # when the guard rails are known; its measurements live in the checkpoint
        self._prior = None
        if self.advising and config.advisor_trace:
            from dsframe_scheduler.advisor import load_trace_workload

            self._prior = load_trace_workload(config.advisor_trace)
        self.advisor = None
        self._advisor_state: Optional[dict] = None
        self._step_start: Optional[tuple] = None    # (setting, batch, perf_counter) of the step being timed
        self._timed: Optional[Setting] = None       # the setting of the last step (its first step is not timed)

    @property
    def advising(self) -> bool:
        """Whether decisions compute the state's advice component."""
        return self.bins.advice and self.config.advisor != "off"

    # -- agent ------------------------------------------------------------------------------
    def _make_learner(self) -> QLearner:
        c = self.config
        if c.policy:
            learner = QLearner.load(c.policy, bins=self.bins)
            learner.hyper.alpha, learner.hyper.gamma = c.alpha, c.gamma
            trained = learner.reward_form
            if trained is not None and c.reward_form is not None and c.reward_form != trained:
                # Q-values of the two forms differ in sign and scale: learning on would mix them
                raise ConfigError("plugins.scheduler.reward_form", c.reward_form,
                                  f"{trained} (the form policy file {c.policy} was trained with), or null")
            self.reward_form = trained or self.reward_form
            learner.reward_form = self.reward_form
            return learner
        learner = QLearner(n_states(self.bins), alpha=c.alpha, gamma=c.gamma, eps_start=c.eps_start,
                           eps_end=c.eps_end, eps_decay_decisions=c.eps_decay_decisions, seed=c.seed,
                           hysteresis=c.hysteresis, bins=self.bins)
        learner.reward_form = self.reward_form
        if c.warm_start:
            # rewards are near ±1 at the start setting, so values near ±1/(1-γ)
            sign = 1.0 if self.reward_form == "rate" else -1.0
            learner.warm_start(conservative_heuristic(self.bins, c.utilisation_threshold), value=0.5,
                               base=sign / (1.0 - c.gamma))
        return learner

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        from dsframe_scheduler.signals import GradientNoiseScale, load_monitor

        self._monitor = load_monitor(self.config.monitor, trainer.strategy.root_device)
        self._noise = GradientNoiseScale()
        setting = self._setting(trainer)
        self.limits = self.config.limits(setting.batch_size)
        if not self.base_batch:
            self.base_batch = setting.global_batch
        switched = None
        if self.switch_at is not None:  # a segment switch: its cost is charged to the pending decision
            switched = max(0.0, time.time() - self.switch_at)
            self.restart_s += switched
            self.switch_at = None
        if self.advising:
            from dsframe_scheduler.advisor import OnlineAdvisor, StepTimeModel

            if self.advisor is None:
                model = StepTimeModel(self.limits, self.base_batch, prior=self._prior, mode=self.config.advisor)
                self.advisor = OnlineAdvisor(model, self.config.lam)
                self.advisor.load_state_dict(self._advisor_state)
            self.advisor.model.limits = self.limits
            if switched is not None:
                self.advisor.model.observe_restart(switched)
        self._step_start, self._timed = None, None   # a new Trainer: its first step is not timed
        if self.pending is not None:
            self.pending["t0"] = time.time()  # the interval's training time starts now
        self.last_decision_step = max(self.last_decision_step, trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.is_global_zero and self._noise is not None and not getattr(pl_module, "dropping_step", False):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self._noise.update(grads, self._setting(trainer).global_batch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.advisor is not None and trainer.is_global_zero:   # the step time the advisor learns from
            self._step_start = (self._setting(trainer), batch_size(batch), time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        started, self._step_start = self._step_start, None
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or (isinstance(outputs, dict) and outputs.get("dropped")):
            self._timed = None
            return                              # a dropped batch (out of memory): no update was made
        if started is not None:
            s, b, t0 = started
            # a full batch of a setting already run (a new setting's first step warms up)
            if b == s.batch_size and s == self._timed:
                self.advisor.model.observe(s, time.perf_counter() - t0)
            self._timed = s
        step, loss = trainer.global_step, float(loss.detach())
        if trainer.is_global_zero:  # the batch as trained (a resize applies from the next one)
            s, b = self._setting(trainer), batch_size(batch)
            self.steps.append({"step": step, "loss": loss, "batch_size": b, "global_batch": b * s.workers,
                               "precision": s.precision, "workers": s.workers, "lr": _lr(trainer)})
        if step - self.last_decision_step >= self.config.every_n_steps:
            self.last_decision_step = step
            self.decide(trainer, pl_module, loss)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_oom(self, trainer, task, batch) -> bool:
        """Back the batch off by ``batch_factor`` (not below min_batch) and go on."""
        old = self._setting(trainer)
        new = next_setting(old, "batch_down", self.limits)
        if new == old:
            return False
        from dsframe_scheduler.actions import apply

        apply(new, old, trainer, task, self.context, self.config.lr_rule, self.base_batch, 0.0, "oom")
        self._oom = True
        self.last_change_step = trainer.global_step
        self.rows.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "time_s": time.time(),
                          "action": "oom_backoff", "how": "oom", "batch_size": old.batch_size,
                          "precision": old.precision, "workers": old.workers, "new_batch_size": new.batch_size,
                          "new_precision": new.precision, "new_workers": new.workers, "applied": "batch"})
        log.warning("scheduler: out of memory at step %d: batch %d -> %d", trainer.global_step,
                    old.batch_size, new.batch_size)
        self._write(trainer)
        return True

    # -- one decision -------------------------------------------------------------------------
    def signals(self, trainer) -> Signals:
        """A reading of every signal (collective: all ranks call it at the same step)."""
        from dsframe_scheduler.signals import comm_latency_ms

        probe = getattr(self._monitor, "comm_latency_ms", None)
        latency = probe(trainer) if callable(probe) else comm_latency_ms(trainer)
        return Signals(utilisation=float(self._monitor.utilisation()), free_memory=float(self._monitor.free_memory()),
                       comm_latency_ms=float(latency), noise_scale=float(self._noise.value if self._noise else 0.0))

    def decide(self, trainer, pl_module, loss: float) -> str:
        signals = self.signals(trainer)
        old = self._setting(trainer)
        decision = None
        if trainer.is_global_zero:
            decision = self._choose(trainer, pl_module, signals, old, loss)
        decision = trainer.strategy.broadcast(decision, src=0)
        new = Setting(*decision["new"])
        from dsframe_scheduler.actions import apply

        kind = "none" if new == old else "batch" if (new.workers, new.precision) == (old.workers, old.precision) \
            else "segment"
        if new != old:
            self.last_change_step = trainer.global_step
        if kind == "segment":
            self.switch_at = time.time()
        if trainer.is_global_zero:  # before apply: a segment switch checkpoints the record
            self.rows[-1]["applied"] = kind
            self._write(trainer)
        return apply(new, old, trainer, pl_module, self.context, self.config.lr_rule, self.base_batch,
                     signals.noise_scale, decision["action"])

    def _choose(self, trainer, pl_module, signals: Signals, old: Setting, loss: float) -> dict:
        c, now = self.config, time.time()
        advice, goal = 0, None
        if self.advisor is not None:            # the goodput model's next move: the state's advice
            self.advisor.update(signals.noise_scale)
            remaining = self._remaining(trainer, pl_module)
            advice, goal = self.advisor.advise(old, remaining)
            signals = replace(signals, advice=advice)
        state = encode_state(signals, old, self.bins, self.limits)
        allowed = allowed_actions(old, self.limits)
        samples = int(getattr(pl_module, "samples_seen", trainer.global_step * old.global_batch))
        r = td = None
        if self.pending is not None:
            p = self.pending
            seconds = max(1e-6, now - p["t0"])
            progress = (samples - p["samples"]) * _efficiency(signals.noise_scale, old.global_batch, self.base_batch)
            if not self.scale and progress > 0:
                self.scale = progress / (seconds * (old.workers + c.lam))
            r = reward(progress, old.workers * seconds, seconds, c.lam, restart_seconds=self.restart_s,
                       oom=self._oom, diverged=not math.isfinite(loss), restart_workers=old.workers,
                       scale=self.scale or 1.0, penalty=c.oom_penalty, form=self.reward_form)
            if c.learn:
                td = self.learner.update(p["state"], p["action"], r, state, allowed)
        if trainer.global_step - self.last_change_step < c.min_steps_between:
            action, how = 0, "cooldown"
        elif self.forced_done < len(c.forced_actions):
            action, how = ACTIONS.index(c.forced_actions[self.forced_done]), "forced"
            self.forced_done += 1
        else:
            greedy = self.learner.greedy(state, allowed)
            action = self.learner.choose(state, allowed, explore=c.learn)
            how = "greedy" if action == greedy else "explore"
        new = next_setting(old, action, self.limits)
        first_state, chain = state, [ACTIONS[action]]
        if how in ("greedy", "explore"):
            # chained moves (as the simulator trains them): same reading, the setting updated after
            # each move; a move takes no time, so it is learned undiscounted and without reward
            for _ in range(c.max_moves - 1):
                if action == 0:
                    break
                if self.advisor is not None:    # as the simulator: the advice from the chained setting
                    signals = replace(signals, advice=self.advisor.advise(new, remaining)[0])
                nxt = encode_state(signals, new, self.bins, self.limits)
                allowed_nxt = allowed_actions(new, self.limits)
                if c.learn:
                    self.learner.update(state, action, 0.0, nxt, allowed_nxt, discount=1.0)
                state, action = nxt, self.learner.choose(nxt, allowed_nxt, explore=c.learn)
                if action != 0:
                    new = next_setting(new, action, self.limits)
                    chain.append(ACTIONS[action])
        self.rows.append({
            "step": trainer.global_step, "epoch": trainer.current_epoch, "time_s": round(now, 3), "state": first_state,
            "state_view": "/".join(str(v) for v in decode_state(first_state, self.bins)),
            "advice": ACTIONS[advice] if self.advisor is not None else "",
            "advice_goal": f"{goal.batch_size}/{goal.precision}/{goal.workers}" if goal is not None else "",
            "action": "+".join(chain),
            "how": how, "reward": "" if r is None else round(r, 5), "td_error": "" if td is None else round(td, 5),
            "epsilon": round(self.learner.epsilon, 4),
            "q_values": "[" + " ".join(f"{q:.4g}" for q in self.learner.q[first_state]) + "]",
            "batch_size": old.batch_size, "precision": old.precision, "workers": old.workers,
            "new_batch_size": new.batch_size, "new_precision": new.precision, "new_workers": new.workers,
            "utilisation": round(signals.utilisation, 4), "free_memory": round(signals.free_memory, 4),
            "comm_latency_ms": round(signals.comm_latency_ms, 4), "noise_scale": round(signals.noise_scale, 2),
            "loss": round(loss, 5), "lr": _lr(trainer), "restart_s": round(self.restart_s, 3)})
        metrics = {"scheduler/action": float(ACTIONS.index(chain[0])), "scheduler/epsilon": self.learner.epsilon,
                   "scheduler/global_batch": float(new.global_batch), "scheduler/workers": float(new.workers),
                   "scheduler/low_precision": float(new.low_precision), "scheduler/state": float(state),
                   "scheduler/advice": float(advice)}
        if r is not None:
            metrics["scheduler/reward"] = float(r)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info("scheduler: step %d state %d %s -> %s (%s), reward %s", trainer.global_step, first_state,
                 "+".join(chain), new, how, r)
        self.pending = {"state": state, "action": action, "t0": time.time(), "samples": samples}
        self.restart_s, self._oom = 0.0, False
        return {"action": "+".join(chain), "new": (new.batch_size, new.precision, new.workers)}

    # -- helpers ------------------------------------------------------------------------------
    def _remaining(self, trainer, pl_module) -> float:
        """Progress left, in steps at the first global batch (the advisor's unit): the stage's
        samples left ÷ that batch; infinite when the task does not count samples."""
        total, seen = int(getattr(pl_module, "total_samples", 0) or 0), int(getattr(pl_module, "samples_seen", 0) or 0)
        if not total or not self.base_batch:
            return float("inf")
        return max(0, total - seen) / self.base_batch

    def _setting(self, trainer) -> Setting:
        from dsframe_scheduler.actions import current_setting

        return current_setting(trainer)

    def _write(self, trainer) -> None:
        if not trainer.is_global_zero or self.context is None:
            return
        from dsframe_scheduler.report import DECISION_FIELDS, STEP_FIELDS, write_csv

        write_csv(self.context.stage_dir / "decisions.csv", DECISION_FIELDS, self.rows)
        write_csv(self.context.stage_dir / "scheduler_steps.csv", STEP_FIELDS, self.steps)

    def finalize(self, model):
        """Runs in the launching process after the last segment: draw the record the ranks wrote."""
        if self.context is not None:
            from dsframe_scheduler.report import plot

            plot(self.context.stage_dir, self.context.stage_dir / "scheduler.png")
        return model

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"learner": self.learner.state_dict(), "base_batch": self.base_batch,
                "last_decision_step": self.last_decision_step, "last_change_step": self.last_change_step,
                "forced_done": self.forced_done, "pending": self.pending, "scale": self.scale,
                "switch_at": self.switch_at, "restart_s": self.restart_s, "rows": self.rows, "steps": self.steps,
                "advisor": self.advisor.state_dict() if self.advisor is not None else self._advisor_state}

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"], source="checkpoint")
        for key in ("base_batch", "last_decision_step", "last_change_step", "forced_done", "pending", "scale",
                    "switch_at", "restart_s", "rows", "steps"):
            setattr(self, key, state[key])
        self._advisor_state = state.get("advisor")   # absent in checkpoints from before the advisor
        if self.advisor is not None:
            self.advisor.load_state_dict(self._advisor_state)


def _lr(trainer) -> float:
    return float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 0.0


def _efficiency(noise_scale: float, batch: int, base: int) -> float:
    """Pollux's statistical efficiency of batch B relative to B0: (B_noise + B0)/(B_noise + B);
    1 when the noise scale is unknown."""
    if noise_scale <= 0 or not base:
        return 1.0
    return (noise_scale + base) / (noise_scale + batch)
