"""What machine a figure came from: CPU model, the instruction-set flags that change int8 and
bf16 kernels, core count, library versions. Every benchmark JSON and report records it."""
from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache

# flags that decide which int8 / bf16 kernels run (and whether u8s8 int8 saturates)
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                  "amx_bf16", "asimd", "asimddp", "i8mm", "bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo ('flags' on x86, 'Features' on ARM); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """A JSON-able record of this machine for benchmark results and reports."""
    import torch

    info = {
        "cpu_model": cpu_model(),
        "arch": platform.machine(),
        "cpu_flags": sorted(f for f in RELEVANT_FLAGS if f in cpu_flags()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    gpus = gpu_count()
    if gpus:
        info["gpus"] = gpus
        name = gpu_name()
        if name:
            info["gpu"] = name
    return info


def gpu_count() -> int:
    """CUDA devices visible to this process, counted without initialising CUDA here (torch asks
    NVML; ``torch.cuda.is_available()`` would initialise it): a process that has initialised CUDA
    can no longer fork training ranks, and dsframe checks configs and writes records in the parent."""
    import torch

    return torch.cuda.device_count()


def gpu_name() -> str | None:
    """The first GPU's name, as fork-safe as :func:`gpu_count`: torch's if CUDA is already up in
    this process, else nvidia-smi's; None if neither answers."""
    import torch

    if torch.cuda.is_initialized():
        return torch.cuda.get_device_name(0)
    return _nvidia_smi_gpu_name()


@lru_cache(maxsize=1)
def _nvidia_smi_gpu_name() -> str | None:
    # asked once per process: every record and report of a run describes the machine
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def describe() -> str:
    """One line for reports: 'AMD EPYC (x86_64, 2 CPUs; avx2 avx512_vnni ...)'."""
    info = machine_info()
    flags = " ".join(info["cpu_flags"]) or "no listed flags"
    gpus = f"; {info['gpus']} × {info.get('gpu', 'GPU')}" if info.get("gpus") else ""
    return f"{info['cpu_model']} ({info['arch']}, {info['cpus']} CPUs; {flags}{gpus})"
