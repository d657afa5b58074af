"""The signals the scheduler observes, each behind a small interface.

* ``Monitor`` — device utilisation and free device memory (0..1). ``LocalMonitor`` reads NVML /
  ``torch.cuda`` when a GPU is present and this process's CPU time and ``/proc/meminfo``
  otherwise; every GPU call is guarded, so a CPU machine (or a broken driver) falls back. A
  cluster supplies its own by naming a factory in ``plugins.scheduler.monitor`` (see
  docs/scheduler.md); a monitor may also define ``comm_latency_ms(trainer)``.
* ``comm_latency_ms`` — a timed small all-reduce across the ranks (0 on one process).
* ``GradientNoiseScale`` — the gradient noise scale B_noise = tr(Σ)/|G|² (McCandlish et al.
  2018; Pollux's statistical efficiency) from per-step gradient statistics.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import statistics
import time
from typing import Any, Optional, Protocol, runtime_checkable

import torch

log = logging.getLogger("dsframe.scheduler")


@runtime_checkable
class Monitor(Protocol):
    """What a device monitor reports; both values in [0, 1]."""

    def utilisation(self) -> float: ...

    def free_memory(self) -> float: ...


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _meminfo() -> Optional[float]:
    """MemAvailable / MemTotal from /proc/meminfo (Linux), else None."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = float(value.split()[0])
        return fields["MemAvailable"] / fields["MemTotal"]
    except (OSError, KeyError, ValueError):
        return None


class LocalMonitor:
    """This process's device: a GPU through NVML / torch.cuda when there is one, else the CPU.

    CPU utilisation is this process's CPU time over wall time since the last reading, divided by
    the cores it may run on; free memory is the host's available fraction.
    """

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device
        self.gpu = self._gpu_index(device)
        self._last = (time.perf_counter(), self._cpu_seconds())

    @staticmethod
    def _gpu_index(device: Optional[torch.device]) -> Optional[int]:
        try:
            if device is not None and device.type == "cuda" and torch.cuda.is_available():
                return device.index if device.index is not None else torch.cuda.current_device()
        except Exception:  # a machine without a working driver
            return None
        return None

    @staticmethod
    def _cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def utilisation(self) -> float:
        if self.gpu is not None:
            try:
                return float(torch.cuda.utilization(self.gpu)) / 100.0  # NVML (pynvml) underneath
            except Exception as exc:  # no pynvml, no NVML: fall back to the host CPU
                log.debug("GPU utilisation unavailable (%s); using CPU time", exc)
        now, cpu = time.perf_counter(), self._cpu_seconds()
        (then, cpu_then), self._last = self._last, (now, cpu)
        if now - then <= 0:
            return 0.0
        return max(0.0, min(1.0, (cpu - cpu_then) / (now - then) / _cores()))

    def free_memory(self) -> float:
        if self.gpu is not None:
            try:
                free, total = torch.cuda.mem_get_info(self.gpu)
                return free / total
            except Exception as exc:
                log.debug("GPU memory unavailable (%s); using host memory", exc)
        fraction = _meminfo()
        if fraction is not None:
            return fraction
        try:
            return os.sysconf("SC_AVPHYS_PAGES") / os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return 1.0


def load_monitor(spec: Optional[str], device: Optional[torch.device] = None) -> Monitor:
    """``None``: the ``LocalMonitor``; ``"package.module:factory"``: ``factory()`` (or
    ``factory(device=...)``) returning an object with ``utilisation()`` and ``free_memory()``."""
    if not spec:
        return LocalMonitor(device)
    from dsframe.errors import ConfigError

    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr or "Monitor")
    except (ImportError, AttributeError) as exc:
        raise ConfigError("plugins.scheduler.monitor", spec, f"an importable 'module:factory' ({exc})") from None
    try:
        monitor = factory(device=device)
    except TypeError:
        monitor = factory()
    if not isinstance(monitor, Monitor):
        raise ConfigError("plugins.scheduler.monitor", spec, "a factory of objects with utilisation() and free_memory()")
    return monitor


def comm_latency_ms(trainer: Any = None, repeats: int = 3) -> float:
    """Median time of a one-element all-reduce across all ranks, in ms; 0 on one process.
    A collective: every rank must call it at the same point."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return 0.0
    device = getattr(getattr(trainer, "strategy", None), "root_device", torch.device("cpu"))
    x = torch.zeros(1, device=device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


class GradientNoiseScale:
    """B_noise = tr(Σ)/|G|² from the gradients of successive steps at global batch B.

    With g_t the (all-reduced) gradient of step t, E|g|² = |G|² + tr(Σ)/B. An exponential moving
    average ḡ of g (weight ``beta``) averages n = (2 − β)/β batches, so E|ḡ|² ≈ |G|² + tr(Σ)/(nB).
    From the EMAs S of |g|² and M = |ḡ|²: tr(Σ)/B = (S − M)/(1 − 1/n), |G|² = S − tr(Σ)/B.
    (Pollux estimates the same two quantities from its replicas' gradients.) The statistics
    restart when B changes. ``value`` is 0 until ~1/β steps were seen (unknown).
    """

    def __init__(self, beta: float = 0.1):
        self.beta = beta
        self.reset(0)

    def reset(self, batch: int) -> None:
        self.batch, self.steps = batch, 0
        self.mean: list[torch.Tensor] = []
        self.sq = 0.0

    @torch.no_grad()
    def update(self, grads: list[torch.Tensor], batch: int) -> None:
        grads = [g.detach().float() for g in grads if g is not None]
        if not grads:
            return
        if batch != self.batch:
            self.reset(batch)
        sq = float(sum(g.pow(2).sum() for g in grads))
        if not math.isfinite(sq):
            return
        b = self.beta
        if not self.mean:
            self.mean, self.sq = [g.clone() for g in grads], sq
        else:
            for m, g in zip(self.mean, grads):
                m.lerp_(g, b)
            self.sq += b * (sq - self.sq)
        self.steps += 1

    def statistics(self) -> tuple[float, float]:
        """(|G|², tr(Σ)/B) estimated so far; (0, 0) before the first step."""
        if not self.mean:
            return 0.0, 0.0
        n = (2.0 - self.beta) / self.beta
        mean_sq = float(sum(m.pow(2).sum() for m in self.mean))
        noise_per_batch = max(0.0, (self.sq - mean_sq) / (1.0 - 1.0 / n))
        return self.sq - noise_per_batch, noise_per_batch

    @property
    def value(self) -> float:
        if self.steps < math.ceil(1.0 / self.beta):
            return 0.0
        signal, noise_per_batch = self.statistics()
        if signal <= 1e-12 * max(self.sq, 1e-30):
            return float(self.batch * 1e6)  # all noise: as large as we can say
        return float(self.batch * noise_per_batch / signal)
