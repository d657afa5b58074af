"""The shared scheduling agent: Q-update, ε decay, masks, state encoding, persistence."""
import json

import numpy as np
import pytest

from dsframe.errors import CheckpointError, ConfigError
from dsframe_scheduler.agent import (
    ACTIONS, Limits, QLearner, Setting, Signals, StateBins, StateView, allowed_actions,
    conservative_heuristic, decode_state, encode_state, follow_advice, n_states, next_setting, reward,
)

A = {name: i for i, name in enumerate(ACTIONS)}


def test_q_update_matches_hand_computed_example():
    q = QLearner(3, alpha=0.1, gamma=0.9)
    q.q[1] = [0.5, 2.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    allowed_next = [True, False, True, True, True, True, True]    # 2.0 is masked out
    # target = 1 + 0.9 * max(0.5, -1, 0, ...) = 1.45; Q(0,1) = 0 + 0.1 * 1.45
    td = q.update(0, 1, 1.0, 1, allowed_next)
    assert td == pytest.approx(1.45)
    assert q.q[0, 1] == pytest.approx(0.145)
    # terminal: target = r = 0.5; Q = 0.145 + 0.1 * (0.5 - 0.145) = 0.1805
    td = q.update(0, 1, 0.5, None)
    assert td == pytest.approx(0.355)
    assert q.q[0, 1] == pytest.approx(0.1805)
    # unmasked next state uses the 2.0: target = -0.2 + 0.9 * 2.0 = 1.6
    q2 = QLearner(3, alpha=0.5, gamma=0.9)
    q2.q[1, 1] = 2.0
    assert q2.update(2, 0, -0.2, 1) == pytest.approx(1.6)
    assert q2.q[2, 0] == pytest.approx(0.8)
    assert q.updates == 2 and q.visits[0, 1] == 2


def test_epsilon_decays_linearly_from_start_to_end_then_stays():
    q = QLearner(1, eps_start=0.3, eps_end=0.05, eps_decay_decisions=100)
    assert q.epsilon == pytest.approx(0.3)
    for _ in range(50):
        q.choose(0)
    assert q.epsilon == pytest.approx(0.175)
    for _ in range(200):
        q.choose(0)
    assert q.epsilon == pytest.approx(0.05)
    # greedy evaluation does not count as a decision
    q.choose(0, explore=False)
    assert q.decisions == 250


def test_exploration_rate_is_epsilon_and_respects_mask():
    q = QLearner(1, eps_start=0.3, eps_end=0.3, seed=1)
    q.q[0, A["batch_up"]] = 5.0
    allowed = [a in ("keep", "batch_up", "batch_down") for a in ACTIONS]
    picks = [q.choose(0, allowed) for _ in range(4000)]
    assert set(picks) <= {A["keep"], A["batch_up"], A["batch_down"]}
    # greedy with p = 0.7 + 0.3/3, each other allowed action 0.1
    assert np.mean([p == A["batch_up"] for p in picks]) == pytest.approx(0.8, abs=0.03)
    assert np.mean([p == A["batch_down"] for p in picks]) == pytest.approx(0.1, abs=0.02)
    # a masked action never wins even with the highest value
    q.q[0, A["workers_up"]] = 100.0
    assert q.greedy(0, allowed) == A["batch_up"]
    with pytest.raises(ConfigError, match="at least one allowed"):
        q.greedy(0, [False] * len(ACTIONS))


def test_hysteresis_keeps_unless_clearly_better():
    q = QLearner(1, hysteresis=0.2)           # relative: must beat keep by 20 % of |Q(keep)|
    q.q[0, A["keep"]] = 2.0
    q.q[0, A["batch_up"]] = 2.35
    assert q.greedy(0) == A["keep"]
    q.q[0, A["batch_up"]] = 2.45
    assert q.greedy(0) == A["batch_up"]
    q.q[0] = -10.0
    q.q[0, A["keep"]] = -2.0                  # also for negative values: -2 + 0.4 = -1.6
    q.q[0, A["batch_up"]] = -1.7
    assert q.greedy(0) == A["keep"]
    q.q[0, A["batch_up"]] = -1.5
    assert q.greedy(0) == A["batch_up"]


def test_allowed_actions_and_next_setting_follow_limits():
    lim = Limits(min_batch=8, max_batch=64, precisions=("32-true", "bf16-mixed"), max_workers=2)
    s = Setting(8, "32-true", 1)
    mask = dict(zip(ACTIONS, allowed_actions(s, lim)))
    assert mask == {"keep": True, "batch_up": True, "batch_down": False, "precision_low": True,
                    "precision_full": False, "workers_up": True, "workers_down": False}
    top = Setting(64, "bf16-mixed", 2)
    mask = dict(zip(ACTIONS, allowed_actions(top, lim)))
    assert mask == {"keep": True, "batch_up": False, "batch_down": True, "precision_low": False,
                    "precision_full": True, "workers_up": False, "workers_down": True}
    assert next_setting(Setting(48, "32-true", 1), "batch_up", lim).batch_size == 64   # clipped
    assert next_setting(s, "precision_low", lim).precision == "bf16-mixed"
    assert next_setting(Setting(8, "32-true", 2), "workers_down", lim).workers == 1
    fp32_only = Limits(8, 64, precisions=("32-true",))
    assert not allowed_actions(s, fp32_only)[A["precision_low"]]


def test_state_encoding_buckets_each_signal_and_round_trips():
    bins = StateBins(utilisation=(0.4, 0.7), free_memory=(0.1, 0.3), comm_latency_ms=(1.0, 10.0),
                     noise_ratio=(0.25, 1.0, 4.0), batch_buckets=4, worker_buckets=3)
    lim = Limits(min_batch=8, max_batch=512, max_workers=8)
    assert n_states(bins) == 3 * 3 * 3 * 4 * 4 * 2 * 3 * 7     # the last: the advisor's move (7 actions)
    assert n_states(StateBins(advice=False)) * 7 == n_states(StateBins())
    # noise 1000 / global batch (64*2=128) = 7.8 -> last noise bucket;
    # batch 64 = log-position 0.5 of [8, 512] -> inner bucket 1 + int(0.5*2) = 2; workers 2 of [1, 8] -> 1
    s = encode_state(Signals(0.75, 0.2, 3.0, 1000.0), Setting(64, "bf16-mixed", 2), bins, lim)
    assert decode_state(s, bins) == StateView(2, 1, 1, 3, 2, 1, 1)
    # edges: a value equal to an edge goes to the upper bucket; min/max batch have buckets of their own
    s = encode_state(Signals(0.4, 0.0, 0.0, 0.0), Setting(8, "32-true", 8), bins, lim)
    assert decode_state(s, bins) == StateView(1, 0, 0, 2, 0, 0, 2)     # unknown noise -> ratio 1
    s = encode_state(Signals(1.0, 1.0, 50.0, 1.0), Setting(512, "32-true", 1), bins, lim)
    assert decode_state(s, bins) == StateView(2, 2, 2, 0, 3, 0, 0)
    s = encode_state(Signals(1.0, 1.0, 50.0, 1.0, advice=ACTIONS.index("workers_up")), Setting(512, "32-true", 1),
                     bins, lim)
    assert decode_state(s, bins) == StateView(2, 2, 2, 0, 3, 0, 0, ACTIONS.index("workers_up"))
    # every index is reachable and decodes back to itself
    for i in (0, 1, 777, n_states(bins) - 1):
        v = decode_state(i, bins)
        assert np.ravel_multi_index(v, bins.sizes) == i
    # the shape does not depend on the limits, so a table transfers between machines
    assert n_states(bins, Limits(1, 2)) == n_states(bins, lim)


def test_bad_config_values_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"alpha=1.5 is not allowed"):
        QLearner(4, alpha=1.5)
    with pytest.raises(ConfigError, match=r"eps_end"):
        QLearner(4, eps_start=0.1, eps_end=0.2)
    with pytest.raises(ConfigError, match=r"bins.utilisation"):
        StateBins(utilisation=(0.7, 0.4))
    with pytest.raises(ConfigError, match=r"max_batch"):
        Limits(min_batch=64, max_batch=8)
    with pytest.raises(ConfigError, match=r"precision='fp8'"):
        Setting(8, "fp8")


def test_warm_start_follows_the_conservative_threshold_rule():
    bins = StateBins()
    lim = Limits(min_batch=8, max_batch=64, max_workers=2)
    q = QLearner(n_states(bins), bins=bins)
    q.warm_start(conservative_heuristic(bins, threshold=0.7))
    busy = encode_state(Signals(0.9, 0.5, 0.0, 100.0), Setting(8, "32-true", 1), bins, lim)
    assert ACTIONS[q.greedy(busy)] == "workers_up"
    busy_max_workers = encode_state(Signals(0.9, 0.5, 0.0, 100.0), Setting(8, "32-true", 2), bins, lim)
    assert ACTIONS[q.greedy(busy_max_workers, allowed_actions(Setting(8, "32-true", 2), lim))] == "batch_up"
    idle = encode_state(Signals(0.5, 0.5, 0.0, 100.0), Setting(8, "32-true", 1), bins, lim)
    assert ACTIONS[q.greedy(idle)] == "keep"
    full = encode_state(Signals(0.9, 0.05, 0.0, 100.0), Setting(32, "32-true", 1), bins, lim)
    assert ACTIONS[q.greedy(full)] == "batch_down"
    # a base value shifts every entry; the heuristic's action stays ahead by `value`
    q.warm_start(conservative_heuristic(bins), value=0.5, base=-10.0)
    assert q.q[busy].max() == -9.5 and q.q[busy].min() == -10.0


def test_warm_start_grows_the_batch_when_the_worker_count_is_fixed():
    # min_workers == max_workers: no worker can be added, so high utilisation grows the batch
    bins = StateBins()
    q = QLearner(n_states(bins), bins=bins)
    q.warm_start(conservative_heuristic(bins, threshold=0.7))
    for workers in (1, 2):
        lim = Limits(min_batch=8, max_batch=64, min_workers=workers, max_workers=workers)
        s = Setting(8, "32-true", workers)
        busy = encode_state(Signals(0.9, 0.5, 0.0, 100.0), s, bins, lim)
        assert ACTIONS[q.greedy(busy, allowed_actions(s, lim))] == "batch_up"


def test_imitation_warm_start_follows_the_advice_component():
    bins = StateBins()
    q = QLearner(n_states(bins), bins=bins)
    q.warm_start(follow_advice(bins), value=0.5, base=-10.0)
    lim = Limits(min_batch=8, max_batch=64, max_workers=4)
    for name in ACTIONS:
        s = encode_state(Signals(0.5, 0.5, 0.0, 100.0, advice=ACTIONS.index(name)), Setting(16, "32-true", 2), bins, lim)
        assert ACTIONS[q.greedy(s)] == name
    assert follow_advice(StateBins(advice=False))(decode_state(0, StateBins(advice=False))) == 0


def test_reward_is_progress_per_cost_with_restart_and_penalties():
    # J = 2 workers * 10 s + λ=1 * 10 s = 30; 300 samples -> 10 per unit of cost
    assert reward(300, 20.0, 10.0, lam=1.0) == pytest.approx(10.0)
    assert reward(300, 20.0, 10.0, lam=0.0) == pytest.approx(15.0)
    # a 5 s restart on 2 workers with λ=1 adds 5 * (2 + 1) = 15
    assert reward(300, 20.0, 10.0, lam=1.0, restart_seconds=5.0, restart_workers=2) == pytest.approx(300 / 45)
    assert reward(300, 20.0, 10.0, lam=1.0, scale=10.0) == pytest.approx(1.0)
    assert reward(300, 20.0, 10.0, lam=1.0, oom=True, penalty=2.0) == -2.0
    assert reward(300, 20.0, 10.0, lam=1.0, diverged=True) == -1.0
    # cost form: -(J / progress) * scale; the restart is charged in full
    assert reward(300, 20.0, 10.0, lam=1.0, form="cost") == pytest.approx(-0.1)
    assert reward(300, 20.0, 10.0, lam=1.0, restart_seconds=5.0, restart_workers=2, scale=10.0,
                  form="cost") == pytest.approx(-1.5)
    assert reward(300, 20.0, 10.0, lam=1.0, oom=True, scale=10.0, form="cost") == pytest.approx(-2.0)
    with pytest.raises(ConfigError, match="reward_form"):
        reward(300, 20.0, 10.0, lam=1.0, form="speed")


def _trained():
    bins = StateBins(batch_buckets=3)
    q = QLearner(n_states(bins), alpha=0.2, gamma=0.8, eps_decay_decisions=10, seed=3, bins=bins)
    rng = np.random.default_rng(0)
    for _ in range(30):
        s = int(rng.integers(q.n_states))
        a = q.choose(s)
        q.update(s, a, float(rng.normal()), int(rng.integers(q.n_states)))
    return q


def test_state_dict_round_trip_continues_identically():
    q = _trained()
    sd = q.state_dict()
    json.dumps(sd)                       # plain types only: fits a Lightning checkpoint
    q2 = QLearner(q.n_states, bins=q.bins)
    q2.load_state_dict(sd)
    assert np.array_equal(q.q, q2.q) and np.array_equal(q.visits, q2.visits)
    assert (q2.decisions, q2.updates, q2.epsilon, q2.alpha, q2.gamma) == \
           (q.decisions, q.updates, q.epsilon, 0.2, 0.8)
    # the exploration RNG comes back too: both make the same next choices
    assert [q.choose(5) for _ in range(20)] == [q2.choose(5) for _ in range(20)]


def test_policy_file_round_trip_and_damaged_files(tmp_path):
    q = _trained()
    path = tmp_path / "policy.json"
    q.save(path, meta={"trained_on": "unit test"})
    q2 = QLearner.load(path)
    assert np.allclose(q.q, q2.q, rtol=1e-5, atol=0) and np.array_equal(q.visits, q2.visits)
    assert q2.bins == q.bins and (q2.decisions, q2.epsilon) == (q.decisions, q.epsilon) and q2.meta == {"trained_on": "unit test"}
    assert QLearner.load(path, bins=StateBins(batch_buckets=3)).n_states == q.n_states

    with pytest.raises(CheckpointError, match="configured bins give"):
        QLearner.load(path, bins=StateBins(batch_buckets=4))
    with pytest.raises(CheckpointError, match="does not exist"):
        QLearner.load(tmp_path / "missing.json")
    (tmp_path / "trunc.json").write_text(path.read_text()[:200])
    with pytest.raises(CheckpointError, match="not readable JSON"):
        QLearner.load(tmp_path / "trunc.json")
    d = json.loads(path.read_text())
    d["q"] = d["q"][:-1]
    (tmp_path / "short.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="does not match"):
        QLearner.load(tmp_path / "short.json")
    d = json.loads(path.read_text())
    d["format"] = "something-else"
    (tmp_path / "other.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="not a scheduler Q-table"):
        QLearner.load(tmp_path / "other.json")
    d = json.loads(path.read_text())
    del d["hyper"]["alpha"], d["actions"]
    (tmp_path / "damaged.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="damaged"):
        QLearner.load(tmp_path / "damaged.json")
    # a loaded table must match the scheduler it is loaded into
    with pytest.raises(CheckpointError, match="differ"):
        QLearner(q.n_states, bins=StateBins(batch_buckets=3, utilisation=(0.5, 0.8))).load_state_dict(q.state_dict())
