"""Measurements shared by the compression stages and benchmarks/compress.py: accuracy, the
exact McNemar test of two models on the same examples, file size, and latency — medians over
repetitions of a whole side-by-side measurement, at a fixed shape or over real sentences."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Iterable

import torch


def size_mb(path: str | os.PathLike) -> float:
    return os.path.getsize(path) / 2**20


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def dummy_inputs(batch: int, seq: int, vocab: int = 30522, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, max(1001, min(vocab, 30000)), (batch, seq), generator=g)
    ids[:, 0] = 101
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def fixed_workload(batch: int, seq: int, vocab: int = 30522, calls: int = 4) -> list[dict]:
    """``calls`` identical random batches of ``batch`` × ``seq`` tokens."""
    x = dummy_inputs(batch, seq, vocab)
    return [x] * calls


def sentence_workload(input_ids: list[list[int]], batch: int, sentences: int | None = 128,
                      pad_id: int = 0) -> list[dict]:
    """Batches of real sentences (token id lists), each padded to its longest sentence as a
    server batching requests would: the data's own length distribution. ``sentences``: that many,
    spread evenly over the list (all with None)."""
    n = len(input_ids)
    idx = range(n) if sentences is None or sentences >= n else [round(i * n / sentences) for i in range(sentences)]
    rows = [input_ids[i] for i in idx]
    out = []
    for k in range(0, len(rows), batch):
        chunk = rows[k:k + batch]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def measure_latency(makers: dict[str, Callable[[int], Callable[[dict], object]]],
                    workloads: dict[str, list[dict]], threads: Iterable[int] = (1,), repeats: int = 3,
                    warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
                    advance: Callable[[int], None] | None = None) -> dict[str, dict[str, dict]]:
    """Latency of several models side by side, the whole measurement repeated ``repeats`` times.

    One measurement, per thread count and workload: every model in turn runs ``warmup`` untimed
    calls (its weights back in the caches after the previous model), then the workload's calls
    back to back, as a server runs them; its figure is the mean ms per call. Models alternate
    inside each repetition, so a change of load on a shared machine hits all alike. Returns
    ``{model: {"<workload>_t<threads>": {"median_ms", "min_ms", "max_ms", "runs_ms"}}}`` over the
    repetitions. Only the model calls are timed: ``make(threads)`` (building a session) and the
    inputs are prepared outside. ``advance(1)`` is called after each model's workload (progress:
    ``len(threads) × repeats × len(workloads) × len(makers)`` calls in all)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: at least 1")
    runs_ms: dict[str, dict[str, list[float]]] = {name: {} for name in makers}
    for t in threads:
        with torch_threads(t):
            runs = {name: make(t) for name, make in makers.items()}
            for _ in range(repeats):
                for wname, calls in workloads.items():
                    for name, run in runs.items():
                        for _ in range(warmup):
                            run(calls[0])
                        t0 = clock()
                        for x in calls:
                            run(x)
                        runs_ms[name].setdefault(f"{wname}_t{t}", []).append((clock() - t0) * 1e3 / len(calls))
                        if advance is not None:
                            advance(1)
    return {name: {k: {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3),
                       "max_ms": round(max(v), 3), "runs_ms": [round(x, 3) for x in v]} for k, v in per.items()}
            for name, per in runs_ms.items()}


def medians(lat: dict[str, dict]) -> dict[str, float]:
    """``{"b1_t1": median ms, ...}`` of one model's ``measure_latency`` entry."""
    return {k: v["median_ms"] for k, v in lat.items()}


def mcnemar(pred_a, pred_b, labels) -> dict:
    """Exact McNemar test of two classifiers on the same examples: the examples only one of them
    gets right, and the two-sided p-value of that split under "equally accurate" (each such
    example is a fair coin: p = min(1, 2·P[Binomial(n, ½) ≤ min(only_a, only_b)]))."""
    import math

    pred_a, pred_b, labels = (torch.as_tensor(x) for x in (pred_a, pred_b, labels))
    if not pred_a.shape == pred_b.shape == labels.shape:
        raise ValueError(f"predictions {tuple(pred_a.shape)}, {tuple(pred_b.shape)} and labels "
                         f"{tuple(labels.shape)} must cover the same examples")
    ra, rb = pred_a == labels, pred_b == labels
    only_a, only_b = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"only_a_right": only_a, "only_b_right": only_b, "n": int(labels.numel()), "p_value": round(p, 6)}


def torch_runner(model: torch.nn.Module, autocast_bf16: bool = False) -> Callable[[int], Callable[[dict], object]]:
    model.eval()

    def make(threads: int):
        def run(x):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                return model(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
        return run
    return make


def ort_runner(path: str | os.PathLike) -> Callable[[int], Callable[[dict], object]]:
    from dsframe_compress.int8 import OrtModel

    def make(threads: int):
        m = OrtModel(path, threads=threads)
        return lambda x: m(x["input_ids"], x["attention_mask"])
    return make


@torch.no_grad()
def accuracy(model: Callable, loader, autocast_bf16: bool = False, limit_batches: int | None = None) -> dict:
    """Accuracy (%) and agreement data of ``model`` (torch module or OrtModel) over ``loader``."""
    if hasattr(model, "eval"):
        model.eval()
    correct = total = 0
    preds = []
    for i, batch in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        p = logits.float().argmax(-1)
        preds.append(p)
        correct += int((p == batch["labels"]).sum())
        total += int(batch["labels"].numel())
    return {"acc": round(100.0 * correct / max(1, total), 3), "n": total,
            "preds": torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)}
