"""Measurements shared by the compression stages and benchmarks/compress.py: test accuracy,
file size, and latency medians at fixed (batch, sequence length, threads)."""
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


def median_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 10, max_seconds: float = 20.0) -> float:
    """Median wall time of ``fn()`` in milliseconds (stops early past ``max_seconds``, ≥ 3 reps)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for i in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if i >= 2 and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def latency_grid(make_runner: Callable[[int], Callable[[dict], object]], vocab: int = 30522,
                 batches: Iterable[int] = (1, 8), threads: Iterable[int] = (1, 2), seq: int = 128,
                 reps: int = 10, warmup: int = 2) -> dict[str, float]:
    """``{"b1_t1": ms, ...}``: ``make_runner(threads)`` returns ``run(inputs)`` for that thread count."""
    out = {}
    for t in threads:
        with torch_threads(t):
            run = make_runner(t)
            for b in batches:
                x = dummy_inputs(b, seq, vocab)
                out[f"b{b}_t{t}"] = round(median_ms(lambda: run(x), warmup, reps), 3)
    return out


def interleaved_latency(makers: dict[str, Callable[[int], Callable[[dict], object]]], vocab: int = 30522,
                        batches: Iterable[int] = (1, 8), threads: Iterable[int] = (1, 2), seq: int = 128,
                        reps: int = 10, warmup: int = 2, max_seconds: float = 60.0,
                        block: int = 4) -> dict[str, dict[str, float]]:
    """Latency medians of several models measured side by side, in rounds: each round runs every
    model in turn, ``block`` timed calls after one untimed call, so a change of load on a shared
    machine hits all of them alike while each model is timed as a server runs it, back to back.
    (Alternating single calls timed every model right after another had evicted its weights from
    the caches: measured, about 20 % slower for a 10 MB int8 student, 10 % for an 86 MB teacher.)"""
    out: dict[str, dict[str, float]] = {name: {} for name in makers}
    rounds = max(3, -(-reps // block))
    for t in threads:
        with torch_threads(t):
            runs = {name: make(t) for name, make in makers.items()}
            for b in batches:
                x = dummy_inputs(b, seq, vocab)
                for run in runs.values():
                    for _ in range(warmup):
                        run(x)
                times: dict[str, list[float]] = {name: [] for name in runs}
                start = time.perf_counter()
                for i in range(rounds):
                    for name, run in runs.items():
                        run(x)  # back in the caches after the previous model
                        for _ in range(block):
                            t0 = time.perf_counter()
                            run(x)
                            times[name].append((time.perf_counter() - t0) * 1e3)
                    if i >= 1 and time.perf_counter() - start > max_seconds:
                        break
                for name, ts in times.items():
                    out[name][f"b{b}_t{t}"] = round(statistics.median(ts), 3)
    return out


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
