"""Built-in strategies and the contract every strategy factory follows.

A strategy factory is registered in the entry-point group ``dsframe.strategies``. The
runner calls ``validate`` before any process starts, then ``build`` for the Lightning
``Strategy`` (or strategy name) to hand the Trainer.

Local multi-process runs start their ranks with the *fork* start method: the ranks inherit
the current Hydra job (its run directory, its overrides) instead of re-running the command
line, which under ``-m`` would re-run the whole sweep in every child.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Optional

from dsframe.errors import ConfigError

START_METHODS = ("fork", "spawn", "popen")
_MASTER_PORT_AT_START = os.environ.get("MASTER_PORT")


def forget_previous_job_port() -> None:
    """Lightning's launcher leaves the port it picked in ``MASTER_PORT``; the next fit in the same
    process (the next stage, the next job of a Hydra multirun) would reuse it while the last
    one's store may still hold it (EADDRINUSE). The runner calls this before building any
    strategy. A port set before dsframe started (torchrun, SLURM, the user) is kept."""
    if os.environ.get("MASTER_PORT") not in (None, _MASTER_PORT_AT_START):
        del os.environ["MASTER_PORT"]


def pick_local_port() -> None:
    """Choose ``MASTER_PORT`` for ranks this process starts itself, unless one is set.

    Lightning would bind port 0, i.e. take a port from the kernel's ephemeral range — the range every
    outgoing connection (gloo's among them) takes its source port from — and release it until rank 0's
    store binds it again: on a busy machine another process can take it in between (EADDRINUSE, seen
    with two jobs of a joblib sweep starting side by side). The ranks meet on a random port below that
    range instead, checked free when it is chosen."""
    import random
    import socket

    if "MASTER_PORT" in os.environ or ranks_started_externally():
        return
    hi = _ephemeral_low() - 1
    lo = max(1024, hi - 12000)
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randint(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        os.environ["MASTER_PORT"] = str(port)
        logging.getLogger("dsframe").debug("local ranks meet on port %d (pid %d)", port, os.getpid())
        return  # nothing free below the ephemeral range: Lightning picks one as before


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems: a port below it is as good a choice


BACKENDS = ("gloo", "nccl")


def ranks_started_externally() -> bool:
    """torchrun, SLURM's srun (hydra/launcher=slurm) or submitit's local executor started this rank:
    Lightning reads it from the environment, and the strategy must not start ranks of its own."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return "LOCAL_RANK" in os.environ or SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


class StrategyFactory:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type]

    def validate(self, config: Any, world_size: int, model: Any, batch_size: int) -> None:
        """Reject an impossible layout before processes start (raise ConfigError)."""

    def validate_plugins(self, config: Any, plugins: list) -> None:
        """Reject plugins this layout cannot run (raise ConfigError); called before launch."""

    def validate_layout(self, config: Any, world_size: int, batch_sizes: dict) -> None:
        """Checks that need neither model nor data, run when the config is validated (before
        anything is built): ``batch_sizes`` maps config keys (``data.batch_size``,
        ``data.eval_batch_size``) to per-rank loader batch sizes. Raise ConfigError."""

    def build(self, config: Any, trainer: Any) -> Any:
        """A Lightning Strategy instance or name, for ``trainer`` (the stage's TrainerConfig)."""
        raise TypeError(f"{type(self).__name__} must define build()")


@dataclass
class LaunchConfig:
    """How the ranks of a multi-process strategy start and talk; shared by ddp and hybrid."""

    backend: Optional[str] = None  # null: nccl on GPUs, gloo on CPUs
    start_method: str = "fork"
    timeout_s: int = 1800

    def __post_init__(self):
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError("strategy.backend", self.backend, f"null or one of {', '.join(BACKENDS)}")
        if self.start_method not in START_METHODS:
            raise ConfigError("strategy.start_method", self.start_method, f"one of {', '.join(START_METHODS)}")
        if self.timeout_s < 1:
            raise ConfigError("strategy.timeout_s", self.timeout_s, "an integer >= 1 (seconds)")

    def resolved_backend(self, accelerator: str) -> str:
        if self.backend:
            return self.backend
        from dsframe.machine import gpu_count

        gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpu_count() > 0)
        return "nccl" if gpu else "gloo"


@dataclass
class DDPConfig(LaunchConfig):
    kind: str = "ddp"
    find_unused_parameters: bool = False


@dataclass
class AutoConfig:
    kind: str = "auto"


class DDP(StrategyFactory):
    name = "ddp"
    description = "data parallel (torch DDP); local ranks are forked, torchrun/SLURM ranks are detected"
    Config = DDPConfig

    def build(self, config: DDPConfig, trainer: Any) -> Any:
        from lightning.pytorch.strategies import DDPStrategy

        # Lightning's script launcher starts nothing when the ranks exist already (fork would double them)
        return DDPStrategy(start_method="popen" if ranks_started_externally() else config.start_method,
                           process_group_backend=config.resolved_backend(trainer.accelerator),
                           timeout=timedelta(seconds=config.timeout_s),
                           find_unused_parameters=config.find_unused_parameters)


class Auto(StrategyFactory):
    name = "auto"
    description = "one process, or forked DDP ranks when trainer.devices or num_nodes > 1"
    Config = AutoConfig

    def build(self, config: AutoConfig, trainer: Any) -> Any:
        if trainer.devices * trainer.num_nodes > 1:
            return DDP().build(DDPConfig(), trainer)
        return "auto"
