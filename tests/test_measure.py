"""The measuring tools of the compression stages: the latency harness (timed on a fake clock whose
cost per call is known, so every figure is exact) and the exact McNemar test (hand-computed)."""
from __future__ import annotations

import math

import pytest
import torch

from dsframe_compress.measure import fixed_workload, mcnemar, measure_latency, medians, sentence_workload


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_model(clock: FakeClock, log: list, name: str, cost_s):
    """A model whose n-th call (1-based, over its whole life) takes ``cost_s(n, x)`` seconds on
    ``clock``; building it takes 1000 s, which the harness must not time."""
    def make(threads: int):
        clock.now += 1000.0
        calls = [0]

        def run(x):
            calls[0] += 1
            log.append((name, calls[0], torch.get_num_threads()))
            clock.now += cost_s(calls[0], x)
        return run
    return make


def test_median_min_max_are_over_repetitions_and_warmup_is_not_timed():
    clock, log = FakeClock(), []
    # the n-th call takes n ms: with one warm-up and one timed call per repetition, the timed
    # calls are the 2nd, 4th and 6th: 2, 4 and 6 ms
    slow = fake_model(clock, log, "slow", lambda n, x: n * 1e-3)
    steady = fake_model(clock, log, "steady", lambda n, x: 5e-3)
    x = fixed_workload(1, 8, vocab=100, calls=1)
    lat = measure_latency({"slow": slow, "steady": steady}, {"b1": x}, threads=(1,), repeats=3, clock=clock)
    assert lat["slow"]["b1_t1"] == {"median_ms": 4.0, "min_ms": 2.0, "max_ms": 6.0, "runs_ms": [2.0, 4.0, 6.0]}
    assert lat["steady"]["b1_t1"]["runs_ms"] == [5.0, 5.0, 5.0]
    assert medians(lat["slow"]) == {"b1_t1": 4.0}
    # models take turns inside every repetition (a drift of load hits both alike)
    assert [name for name, _, _ in log] == ["slow", "slow", "steady", "steady"] * 3


def test_mean_per_call_over_a_workload_and_threads():
    clock, log = FakeClock(), []
    per_token = fake_model(clock, log, "m", lambda n, x: 1e-3 * x["input_ids"].numel())  # 1 ms per token
    fixed = fixed_workload(2, 8, vocab=100, calls=3)                                      # 16 tokens a call
    sents = sentence_workload([[5, 6, 7], [8, 9], [1, 2, 3, 4, 5]], batch=2, sentences=None, pad_id=0)
    lat = measure_latency({"m": per_token}, {"b2": fixed, "test_b2": sents}, threads=(1, 2), repeats=3,
                          warmup=2, clock=clock)
    for t in (1, 2):
        assert lat["m"][f"b2_t{t}"]["median_ms"] == pytest.approx(16.0)
        # batches padded to their longest sentence: 2 × 3 and 1 × 5 tokens, mean 5.5 ms a call
        assert lat["m"][f"test_b2_t{t}"]["median_ms"] == pytest.approx(5.5)
    # calls: per thread count and repetition, 2 warm-up + the workload's calls, for each workload
    assert len(log) == 2 * 3 * ((2 + 3) + (2 + 2))
    assert {threads for _, _, threads in log[:27]} == {1} and {threads for _, _, threads in log[27:]} == {2}


def test_sentence_workload_pads_real_sentences_per_batch():
    ids = [[101, 7, 102], [101, 102], [101, 4, 5, 6, 102], [101, 9, 102]]
    w = sentence_workload(ids, batch=2, sentences=None, pad_id=0)
    assert [b["input_ids"].tolist() for b in w] == [[[101, 7, 102], [101, 102, 0]], [[101, 4, 5, 6, 102], [101, 9, 102, 0, 0]]]
    assert w[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    # a subset is spread over the whole list (not its first sentences)
    assert [b["input_ids"].tolist() for b in sentence_workload(ids, batch=1, sentences=2)] == [[[101, 7, 102]], [[101, 4, 5, 6, 102]]]


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency({}, {}, repeats=0)


def test_mcnemar_exact_binomial_by_hand():
    # 20 examples: both right on 6, both wrong on 2, only A right on 2, only B right on 10
    labels = torch.zeros(20, dtype=torch.long)
    a = torch.tensor([0] * 6 + [1] * 2 + [0] * 2 + [1] * 10)
    b = torch.tensor([0] * 6 + [1] * 2 + [1] * 2 + [0] * 10)
    res = mcnemar(a, b, labels)
    assert (res["only_a_right"], res["only_b_right"], res["n"]) == (2, 10, 20)
    # two-sided exact p: 2 · P[Bin(12, ½) ≤ 2] = 2 · (1 + 12 + 66) / 4096 = 158 / 4096
    assert res["p_value"] == pytest.approx(158 / 4096, abs=1e-6)
    assert mcnemar(b, a, labels)["p_value"] == res["p_value"]


def test_mcnemar_balanced_and_empty_splits():
    labels = torch.zeros(8, dtype=torch.long)
    a = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])
    b = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])  # 3 vs 3: no evidence either way
    assert mcnemar(a, b, labels)["p_value"] == 1.0
    assert mcnemar(a, a, labels) == {"only_a_right": 0, "only_b_right": 0, "n": 8, "p_value": 1.0}
    # 0 vs 5: 2 / 32
    assert mcnemar(torch.ones(5, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                   torch.zeros(5, dtype=torch.long))["p_value"] == pytest.approx(2 / 2 ** 5)
    with pytest.raises(ValueError, match="same examples"):
        mcnemar(a, b[:4], labels)
    assert math.isclose(mcnemar(a, b, labels)["p_value"], 1.0)
