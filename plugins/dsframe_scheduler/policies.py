"""The scheduling policies the benchmark compares, all driving a :class:`ClusterSim`.

- :class:`Static` — one setting for the whole job (the user's default, or the best one in
  hindsight, found by :func:`best_static`).
- :class:`ThresholdRule` — the article's rule: utilisation above 70 % scales up (another
  worker; a larger batch once workers are at their maximum), below ``low`` scales down,
  almost no free memory halves the batch; then a cooldown of some decisions.
- :class:`GoodputRule` — Pollux-style: goodput = throughput × statistical efficiency, the
  efficiency from the measured gradient noise scale; it picks the (batch, workers) with the
  least predicted cost per unit of progress and moves only if the predicted gain is ≥ 5 % and
  pays back the restart over the rest of the job. The LR follows AdaScale (the simulator's
  progress model is AdaScale's gain, for every policy alike).
- :class:`QPolicy` — the shared tabular Q-learner (:mod:`dsframe_scheduler.agent`), trained
  by :func:`train_q` in the simulator, evaluated greedily on fresh seeds. Its state includes
  the :class:`GoodputAdvisor`'s next move (what the goodput rule would do, one action at a
  time) and it can be warm-started by imitating it (DL2 needed an imitation start); what it
  does with the advice is learned.
- :class:`Oracle` — perfect foresight: dynamic programming over every setting at every
  decision point on the noise-free cost model of the very run (its interference included);
  it picks its first setting freely, as the best static setting does.

:func:`run_episode` plays a policy for one job and returns its cost J = worker·s + λ·s.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import numpy as np

from dsframe_scheduler.agent import (
    ACTIONS, QLearner, Setting, Signals, StateBins, allowed_actions,
    conservative_heuristic, encode_state, follow_advice, n_states, next_setting, reward,
)
from dsframe.errors import ConfigError
from dsframe_scheduler.simulator import ClusterSim, Workload

__all__ = ["Policy", "Static", "ThresholdRule", "GoodputAdvisor", "GoodputRule", "QPolicy", "Oracle",
           "run_episode", "best_static", "train_q", "Episode", "expected_cost"]


@dataclass
class Episode:
    cost: float
    seconds: float
    worker_seconds: float
    restarts: int
    ooms: int
    actions: list
    settings: list


class Policy(abc.ABC):
    name = "policy"
    start: Optional[Setting] = None          # None: the workload's static default

    def reset(self, sim: ClusterSim, lam: float) -> None:
        pass

    @abc.abstractmethod
    def act(self, signals: Signals, sim: ClusterSim):
        """An action (index or name), or a Setting to jump to (one restart at most)."""

    def observe(self, result, signals_next: Signals, sim: ClusterSim) -> None:
        pass


def run_episode(workload: Workload, policy: Policy, lam: float, seed: int, noise: bool = True,
                start_chunk: int = 0) -> Episode:
    sim = ClusterSim(workload, seed=seed, noise=noise, start=policy.start, start_chunk=start_chunk)
    policy.reset(sim, lam)
    cost = seconds = worker_seconds = 0.0
    restarts = ooms = 0
    actions, settings = [], []
    signals = sim.observe()
    while not sim.done:
        a = policy.act(signals, sim)
        before = sim.setting
        r = sim.step(a)
        signals = sim.observe()
        policy.observe(r, signals, sim)
        cost += r.cost(lam)
        seconds += r.seconds + r.restart_seconds
        worker_seconds += r.worker_seconds + r.restart_seconds * r.restart_workers
        restarts += int(r.restart_seconds > 0)
        ooms += int(r.oom)
        actions.append(a if isinstance(a, str) else (ACTIONS[a] if not isinstance(a, Setting) else "jump"))
        settings.append((r.setting.batch_size, r.setting.precision, r.setting.workers, before != r.setting))
    return Episode(cost, seconds, worker_seconds, restarts, ooms, actions, settings)


# ----------------------------------------------------------------------------- static
class Static(Policy):
    def __init__(self, setting: Optional[Setting] = None, name: str = "static_default"):
        self.start, self.name = setting, name

    def act(self, signals, sim):
        return "keep"


def expected_cost(workload: Workload, s: Setting, lam: float, interference: float = 1.0) -> float:
    """Noise-free cost J of a whole job run on one setting."""
    b = workload.chunk_bounds()
    secs = sum(workload.chunk_seconds(s, p0, p1, interference) for p0, p1 in zip(b[:-1], b[1:]))
    return secs * (s.workers + lam)


def best_static(workload: Workload, lam: float) -> Setting:
    """The single setting with the least expected cost (hindsight: it knows the whole job)."""
    return min(workload.settings(), key=lambda s: expected_cost(workload, s, lam))


# ----------------------------------------------------------------------------- threshold
class ThresholdRule(Policy):
    name = "threshold"

    def __init__(self, high: float = 0.7, low: float = 0.3, cooldown: int = 3, min_free_memory: float = 0.1):
        self.high, self.low, self.cooldown, self.min_free = high, low, cooldown, min_free_memory

    def reset(self, sim, lam):
        self.wait = 0

    def act(self, signals, sim):
        if self.wait > 0:
            self.wait -= 1
            return "keep"
        allowed = dict(zip(ACTIONS, allowed_actions(sim.setting, sim.w.limits)))
        a = "keep"
        if signals.free_memory < self.min_free and allowed["batch_down"]:
            a = "batch_down"
        elif signals.utilisation > self.high:
            a = "workers_up" if allowed["workers_up"] else ("batch_up" if allowed["batch_up"] else "keep")
        elif signals.utilisation < self.low and allowed["workers_down"]:
            a = "workers_down"
        if a != "keep":
            self.wait = self.cooldown
        return a


# ----------------------------------------------------------------------------- goodput
class GoodputAdvisor:
    """Pollux's goodput model for what one job controls: batch size, workers and — beyond
    Pollux, so that the baseline is as strong as the Q-learner's action set — precision, with
    the workload's precision model (``precisions=("32-true",)`` is Pollux proper). The noise
    scale comes from the monitor, smoothed.

    It works on a *step-time model*: any object with ``settings()`` (the candidate settings),
    ``step_time(setting)`` (seconds per step; NaN where it cannot predict), ``fits(setting)``,
    ``needs_restart(a, b)``, ``limits``, ``init_batch`` (the batch B0 progress is counted in)
    and ``restart_seconds``. In the simulator that is the :class:`Workload` fitted on the trace
    (:meth:`reset` takes a :class:`ClusterSim`); online it is
    :class:`dsframe_scheduler.advisor.StepTimeModel`, the same fitted form from a trace and/or the
    job's own measured step times (:meth:`start`, :meth:`refresh`). Pollux fits the same form online.

    :meth:`goal` is the setting with the least predicted cost per unit of progress, if it
    gains ≥ ``min_gain`` and pays back its restart over the ``remaining`` progress (else the
    current one); :meth:`advise` is the first action of the ladders that leads towards it.
    :meth:`target` and :meth:`advice` are the same on a simulated job."""

    def __init__(self, min_gain: float = 0.05, smoothing: float = 0.5, precisions=None):
        self.min_gain, self.smoothing = min_gain, smoothing
        self.precisions = None if precisions is None else tuple(precisions)
        self.b_noise = None

    def reset(self, sim: ClusterSim, lam: float) -> None:
        self.start(sim.w, lam)

    def start(self, model, lam: float) -> None:
        """A new job on ``model`` at price λ: the smoothed noise scale starts afresh."""
        self.lam, self.b_noise = lam, None
        self.refresh(model)

    def refresh(self, model) -> None:
        """(Re)read the candidates' step times (online the model learns as the job runs)."""
        self.model = model
        lam = self.lam
        cands = [s for s in model.settings() if self.precisions is None or s.precision in self.precisions]
        step = np.array([model.step_time(s) for s in cands], dtype=float)
        keep = np.isfinite(step)                             # a simulated workload predicts every one
        if not keep.all():
            cands, step = [s for s, k in zip(cands, keep) if k], step[keep]
        self.candidates = cands
        self._index = {(s.batch_size, s.precision, s.workers): i for i, s in enumerate(self.candidates)}
        self._step = step
        self._scale = np.array([s.global_batch / model.init_batch for s in self.candidates], dtype=float)
        self._price = np.array([s.workers + lam for s in self.candidates], dtype=float)

    def update(self, noise_scale: float) -> None:
        self.b_noise = noise_scale if self.b_noise is None else \
            self.smoothing * self.b_noise + (1 - self.smoothing) * noise_scale

    def costs(self) -> np.ndarray:
        """Predicted cost per unit of progress of every candidate setting (under the model given
        to :meth:`start`)."""
        phi = self.b_noise / self.model.init_batch        # = grad_var / grad_sqr
        if not np.isfinite(phi):                          # no measurable gradient signal: linear scaling
            gain = self._scale
        else:
            gain = np.clip((phi + 1.0) / (phi / self._scale + 1.0), np.minimum(1.0, self._scale),
                           np.maximum(1.0, self._scale))
        return self._step / gain * self._price

    def cost_of(self, s: Setting, costs: Optional[np.ndarray] = None) -> float:
        i = self._index.get((s.batch_size, s.precision, s.workers))
        if i is None:                                       # outside the candidates: compute it
            m = self.model
            phi, scale = self.b_noise / m.init_batch, s.global_batch / m.init_batch
            gain = scale if not np.isfinite(phi) else (phi + 1.0) / (phi / scale + 1.0)
            return m.step_time(s) / gain * (s.workers + self.lam)
        return float((self.costs() if costs is None else costs)[i])

    def goal(self, cur: Setting, remaining: float) -> Setting:
        """Where the goodput model would go from ``cur`` with ``remaining`` progress (in steps
        at ``init_batch``) left: ``cur`` itself when no move pays."""
        if self.b_noise is None or not self.candidates:     # no noise scale measured, nothing predicted
            return cur
        m = self.model
        costs = self.costs()
        best = self.candidates[int(np.argmin(costs))]
        now, new = self.cost_of(cur, costs), float(costs.min())
        if not np.isfinite(now) or best == cur or new > now * (1 - self.min_gain):
            return cur
        restart = m.restart_seconds * (best.workers + self.lam) if m.needs_restart(cur, best) else 0.0
        return cur if (now - new) * remaining <= restart else best

    def advise(self, cur: Setting, allowed, remaining: float, goal: Optional[Setting] = None) -> int:
        """The allowed action from ``cur`` that moves towards :meth:`goal` (given, or computed
        here) with the least predicted cost (an index in ACTIONS; 0 = keep)."""
        goal = self.goal(cur, remaining) if goal is None else goal
        if goal == cur:
            return 0
        m = self.model
        costs = self.costs()
        best, best_cost = 0, float("inf")
        for a in range(1, len(ACTIONS)):
            if not allowed[a]:
                continue
            nxt = next_setting(cur, a, m.limits)
            closer = (abs(np.log2(nxt.batch_size / goal.batch_size)) < abs(np.log2(cur.batch_size / goal.batch_size))
                      or (nxt.precision == goal.precision != cur.precision)
                      or abs(np.log2(nxt.workers / goal.workers)) < abs(np.log2(cur.workers / goal.workers)))
            if closer and m.fits(nxt):
                c = self.cost_of(nxt, costs)
                if c < best_cost:
                    best, best_cost = a, c
        return best

    def target(self, sim: ClusterSim, setting: Optional[Setting] = None) -> Setting:
        """:meth:`goal` on a simulated job (its progress left)."""
        return self.goal(setting or sim.setting, sim.bounds[-1] - sim.progress)

    def advice(self, sim: ClusterSim, allowed, setting: Optional[Setting] = None) -> int:
        """:meth:`advise` on a simulated job, from ``setting`` (default the job's current one)."""
        return self.advise(setting or sim.setting, allowed, sim.bounds[-1] - sim.progress)


class GoodputRule(Policy):
    """Pollux-style: moves straight to the :class:`GoodputAdvisor`'s target (one restart)."""
    name = "goodput"

    def __init__(self, min_gain: float = 0.05, smoothing: float = 0.5, precisions=None):
        self.advisor = GoodputAdvisor(min_gain, smoothing, precisions)

    def reset(self, sim, lam):
        self.advisor.reset(sim, lam)

    def act(self, signals, sim):
        self.advisor.update(signals.noise_scale)
        goal = self.advisor.target(sim)
        return "keep" if goal == sim.setting else goal


# ----------------------------------------------------------------------------- Q-learning
class QPolicy(Policy):
    """The Q-table driving a simulated job. With ``max_moves > 1`` the agent may chain up to that
    many actions at one decision (the same reading, the setting updated after each move) and the
    job restarts once for all of them, as the goodput rule's single jump does; the chained moves
    take no time, so they are not discounted (a semi-MDP step of zero duration) and earn no
    reward of their own — the chunk trained afterwards rewards the last one."""
    name = "q_learning"

    def __init__(self, learner: QLearner, bins: StateBins, explore: bool = False, reward_scale: float = 1.0,
                 reward_form: str = "cost", cooldown: int = 0, advisor: Optional[GoodputAdvisor] = None,
                 max_moves: int = 1):
        self.q, self.bins, self.explore, self.scale, self.form = learner, bins, explore, reward_scale, reward_form
        self.cooldown = int(cooldown)       # decisions kept after a restart (min steps between changes)
        self.advisor = advisor if advisor is not None else (GoodputAdvisor() if bins.advice else None)
        self.imitate = False                # training: behave like the advisor (ε-greedy around it)
        if int(max_moves) < 1:
            raise ConfigError("max_moves", max_moves, "an integer >= 1")
        self.max_moves = int(max_moves)

    def reset(self, sim, lam):
        self.lam, self.prev, self._next = lam, None, None
        self._masks, self._wait = {}, 0
        if self.advisor is not None:
            self.advisor.reset(sim, lam)

    def _state(self, signals, sim, setting: Optional[Setting] = None, update: bool = True):
        setting = setting or sim.setting
        if self.advisor is not None:        # the reading's advice: what the goodput model would do next
            if update:
                self.advisor.update(signals.noise_scale)
            signals = Signals(signals.utilisation, signals.free_memory, signals.comm_latency_ms,
                              signals.noise_scale, self.advisor.advice(sim, self._allowed(sim, setting), setting))
        self._advice = signals.advice
        return encode_state(signals, setting, self.bins, sim.w.limits)

    def _allowed(self, sim, setting: Optional[Setting] = None):
        s = setting or sim.setting
        key = (s.batch_size, s.precision, s.workers)
        if key not in self._masks:
            self._masks[key] = np.asarray(allowed_actions(s, sim.w.limits), dtype=bool)
        return self._masks[key]

    def _pick(self, s, allowed) -> int:
        if self.imitate:                                 # off-policy: the advisor's moves, ε around them
            a = self.q.choose(s, allowed, explore=True)
            return int(self._advice) if a == self.q.greedy(s, allowed) else a
        return self.q.choose(s, allowed, explore=self.explore)

    def act(self, signals, sim):
        s = self._next if self._next is not None else self._state(signals, sim)
        self._next = None
        if self._wait > 0:
            self._wait -= 1
            self.prev = (s, 0)
            return 0                                     # keep
        setting, limits = sim.setting, sim.w.limits
        for move in range(self.max_moves):
            allowed = self._allowed(sim, setting)
            a = self._pick(s, allowed)
            if a == 0 or move == self.max_moves - 1:
                break
            new = next_setting(setting, a, limits)
            s_new = self._state(signals, sim, new, update=False)
            if self.explore:                             # zero time, zero reward: no discount
                self.q.update(s, a, 0.0, s_new, self._allowed(sim, new), discount=1.0)
            setting, s = new, s_new
        self.prev = (s, a)
        setting = next_setting(setting, a, limits)
        if sim.w.needs_restart(sim.setting, setting):
            self._wait = self.cooldown
        if setting == sim.setting:
            return 0
        return a if self.max_moves == 1 else setting

    def observe(self, r, signals_next, sim):
        if not self.explore:
            return
        s, a = self.prev
        rew = reward(r.progress, r.worker_seconds, r.seconds, self.lam, r.restart_seconds, oom=r.oom,
                     restart_workers=r.restart_workers, scale=self.scale, form=self.form)
        s_next = None if r.done else self._state(signals_next, sim)
        self._next = s_next                      # the next act() sees the same reading
        self.q.update(s, a, rew, s_next, self._allowed(sim), done=r.done)


def reward_scale(workload: Workload, lam: float) -> float:
    """Progress per unit of cost of the static default on the first chunk: rewards near 1."""
    s = workload.static_default
    b = workload.chunk_bounds()
    secs = workload.chunk_seconds(s, b[0], b[1])
    return (b[1] - b[0]) / (secs * (s.workers + lam))


def train_q(workload: Workload, lam: float, episodes: int = 300, seed: int = 0,
            bins: Optional[StateBins] = None, alpha: float = 0.1, gamma: float = 0.9,
            eps_start: float = 0.3, eps_end: float = 0.05, hysteresis: float = 0.0,
            reward_form: str = "cost", exploring_starts: float = 0.5, cooldown: int = 0,
            warm_start: str = "threshold", imitation: float = 0.0, max_moves: int = 1,
            progress=None) -> QPolicy:
    """Q-learning in the simulator: warm start from a heuristic (``threshold``: the article's
    rule; ``advice``: follow the goodput advisor, with the state's advice component), ε decaying
    over the first 80 % of the decisions, training seeds ``seed·10⁶ + i`` (evaluation uses others).

    The first ``imitation`` fraction of the episodes behaves like the advisor (ε-greedy around
    its move) while the table learns from what that behaviour earns (off-policy Q-learning on
    demonstrations, DL2's imitation start); the rest is ordinary ε-greedy on the table.

    With probability ``exploring_starts`` a training episode starts from a random setting at a
    random point of the job (exploring starts): ε-greedy walks alone rarely reach settings
    many actions away from the default, or see them late in the job."""
    bins = bins or StateBins()
    decisions = episodes * workload.spec.decisions
    learner = QLearner(n_states(bins), alpha=alpha, gamma=gamma, eps_start=eps_start, eps_end=eps_end,
                       eps_decay_decisions=max(1, int(0.8 * decisions)), seed=seed, hysteresis=hysteresis,
                       bins=bins)
    # base: the discounted value of staying on the start setting (reward ±1 per decision)
    base = (1.0 if reward_form == "rate" else -1.0) / (1.0 - gamma)
    if warm_start not in ("threshold", "advice"):
        raise ConfigError("warm_start", warm_start, "threshold or advice")
    if warm_start == "advice" and not bins.advice:
        raise ConfigError("warm_start", warm_start, "threshold (the bins have no advice component)")
    if not 0.0 <= imitation <= 1.0 or (imitation > 0 and not bins.advice):
        raise ConfigError("imitation", imitation, "a fraction in [0, 1] (> 0 needs bins.advice)")
    heuristic = follow_advice(bins) if warm_start == "advice" else conservative_heuristic(bins)
    learner.warm_start(heuristic, value=0.5, base=base)
    learner.reward_form = reward_form
    policy = QPolicy(learner, bins, explore=True, reward_scale=reward_scale(workload, lam),
                     reward_form=reward_form, cooldown=cooldown, max_moves=max_moves)
    n_imitation = int(round(imitation * episodes))
    rng = np.random.default_rng(seed)
    settings = workload.settings()
    for i in range(episodes):
        start_chunk = 0
        policy.start = None
        if rng.random() < exploring_starts:
            policy.start = settings[int(rng.integers(len(settings)))]
            start_chunk = int(rng.integers(workload.spec.decisions))
        policy.imitate = i < n_imitation
        run_episode(workload, policy, lam, seed=seed * 1_000_000 + i, start_chunk=start_chunk)
        if progress is not None:
            progress()
    policy.explore, policy.start, policy.imitate = False, None, False
    return policy


# ----------------------------------------------------------------------------- oracle
class Oracle(Policy):
    """Plans the whole job at reset by dynamic programming over (decision, setting) on the
    noise-free cost model of this run (its interference is known: perfect foresight)."""
    name = "oracle"

    def reset(self, sim, lam):
        w = sim.w
        S = w.settings()
        b = sim.bounds
        K = len(b) - 1
        chunk = np.array([[w.chunk_seconds(s, b[k], b[k + 1], sim.interference) * (s.workers + lam)
                           for s in S] for k in range(K)])                     # [K, S]
        restart = np.array([[w.spec.restart_seconds * (t.workers + lam) if w.needs_restart(s, t) else 0.0
                             for t in S] for s in S])                          # [from, to]
        value = np.zeros(len(S))
        choice = np.zeros((K, len(S)), dtype=int)
        value_after_first = None
        for k in reversed(range(K)):
            if k == 0:
                value_after_first = value.copy()
            total = restart + (chunk[k] + value)[None, :]                      # [from, to]
            choice[k] = np.argmin(total, axis=1)
            value = total[np.arange(len(S)), choice[k]]
        # the schedule includes its first setting: like the best static one, it starts there
        # without a restart (so the oracle is a lower bound of both)
        first = chunk[0] + value_after_first
        i = int(np.argmin(first))
        sim.setting = S[i]
        self.plan = []
        for k in range(K):
            i = choice[k, i]
            self.plan.append(S[i])
        self.expected = None

    def act(self, signals, sim):
        return self.plan[sim.k]
