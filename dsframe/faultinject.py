"""Fault injection for the reliability tests and ``benchmarks/faults.py``.

Faults are plugins, loaded the way an outside package's are: ``install(dir)`` writes a
``dist-info`` folder whose entry points register them, and a run started with that folder on
``PYTHONPATH`` may list them (``+recipe.stages.S.plugins=[fault_pause]``). Nothing in dsframe
imports this module; ``python -m dsframe list`` shows these plugins only where installed.

* ``fault_pause``: at global step ``at_step`` (or in ``finalize``, i.e. after the fit) writes
  ``paused-<rank>`` in the stage directory and sleeps, once per stage directory, so a test can
  send a signal at a known step. Every rank also appends each finished step to
  ``trained-<rank>.txt``: lines beyond the final global step are steps trained twice.
* ``fault_nan``: the training loss is NaN at steps ``at_step`` .. ``at_step + count - 1``.
* ``fault_disk_full``: from step ``at_step`` on, ``torch.save`` fails with ENOSPC.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dsframe.plugin import Plugin

ENTRY_POINTS = {"fault_pause": "PausePlugin", "fault_nan": "NanPlugin", "fault_disk_full": "DiskFullPlugin"}


def install(directory: str | os.PathLike) -> Path:
    """Register the fault plugins for processes that get ``directory`` on PYTHONPATH."""
    info = Path(directory) / "dsframe_faultinject-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dsframe-faultinject\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[dsframe.plugins]\n" + "".join(f"{n} = dsframe.faultinject:{c}\n" for n, c in ENTRY_POINTS.items()))
    return Path(directory)


@dataclass
class PauseConfig:
    at_step: int = -1  # -1: never during fit
    in_finalize: bool = False  # pause after the fit instead (outside Lightning's loop)
    seconds: float = 60.0
    rank: int = -1  # -1: every rank pauses; else only that global rank


class PausePlugin(Plugin):
    name = "fault_pause"
    description = "fault injection: pause at a step so a signal lands there"
    Config = PauseConfig

    def _pause(self, rank: int) -> None:
        stage_dir = self.context.stage_dir
        if (stage_dir / f"paused-{rank}").exists() or self.config.rank not in (-1, rank):
            return  # once per stage directory: a rerun goes through
        (stage_dir / f"paused-{rank}").write_text(str(os.getpid()))
        from dsframe.resilience import pending_signal

        deadline = time.monotonic() + self.config.seconds
        while time.monotonic() < deadline and pending_signal() is None:
            time.sleep(0.05)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.context.stage_dir / f"trained-{trainer.global_rank}.txt", "a") as f:
            f.write(f"{trainer.global_step}\n")
        if trainer.global_step == self.config.at_step:
            self._pause(trainer.global_rank)

    def finalize(self, model):
        if self.config.in_finalize:
            self._pause(0)
        return model


@dataclass
class NanConfig:
    at_step: int = 3
    count: int = 1


class NanPlugin(Plugin):
    name = "fault_nan"
    description = "fault injection: a NaN training loss at some steps"
    Config = NanConfig

    def loss(self, task, batch, outputs, loss):
        step = task.trainer.global_step
        if self.config.at_step <= step < self.config.at_step + self.config.count:
            return loss * float("nan")
        return None


@dataclass
class DiskFullConfig:
    at_step: int = 3


class DiskFullPlugin(Plugin):
    name = "fault_disk_full"
    description = "fault injection: the disk is full from a step on (torch.save raises ENOSPC)"
    Config = DiskFullConfig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.config.at_step:
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            torch.save = full


# -- driving real runs -----------------------------------------------------------------------------
def start(args: list[str], cwd: str | os.PathLike, plugin_dir: str | os.PathLike,
          env: Optional[dict] = None) -> subprocess.Popen:
    """``python -m dsframe ARGS`` in its own process group (as a batch scheduler starts a job)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(plugin_dir), full_env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "dsframe", *args], cwd=cwd, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until ``path`` exists (True) or the process ended / time ran out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return path.exists()
        time.sleep(0.05)
    return False


def rank_pids(stage_dir: Path) -> dict[int, int]:
    """Global rank -> pid of the ranks that paused."""
    return {int(p.name.split("-")[1]): int(p.read_text()) for p in stage_dir.glob("paused-*")}


def descendants(pid: int) -> list[int]:
    """Processes started (transitively) by ``pid`` that still run (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    os.killpg(proc.pid, sig)


def trained_steps(stage_dir: Path, rank: int = 0) -> list[int]:
    path = stage_dir / f"trained-{rank}.txt"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


# -- scenarios: one injected fault each, on real processes; shared by the tests and benchmarks/faults.py --
SINGLE = ["recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=1.0", "trainer.max_epochs=2",
          "checkpoint.every_n_steps=4", "+recipe.stages.finetune.plugins=[fault_pause]"]
DDP = ["recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=1.0", "trainer.max_epochs=2",
       "strategy=ddp", "trainer.devices=2", "strategy.timeout_s=60", "checkpoint.every_n_steps=2",
       "+recipe.stages.finetune.plugins=[fault_pause]"]
HYBRID = ["recipe=lm_hybrid_parallel", "debug=lm_fast", "trainer.max_steps=10", "strategy.tp=2", "strategy.pp=1",
          "strategy.micro_batches=1", "trainer.devices=2", "strategy.timeout_s=60", "checkpoint.every_n_steps=4",
          "trainer.enable_progress_bar=false", "+recipe.stages.train.plugins=[fault_pause]"]
LAYOUTS = {"single": (SINGLE, "finetune", 4), "ddp": (DDP, "finetune", 2), "hybrid": (HYBRID, "train", 4)}


@dataclass
class Outcome:
    """What one injected fault did: the interrupted run and the rerun of the same command."""

    fault: str
    rc: int  # exit status of the interrupted run (negative: killed by that signal)
    stderr_tail: str
    left_running: list  # processes of the run still alive after it ended (orphan ranks)
    rerun_rc: Optional[int]
    trained: list  # global steps finished by rank 0, both runs together, in order
    final_step: Optional[int]
    interval: int
    stage_dir: Path
    seconds: float

    @property
    def lost_steps(self) -> int:
        """Steps trained twice because the rerun resumed from an earlier point than the stop."""
        return len(self.trained) - len(set(self.trained))

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr_tail

    @property
    def survived(self) -> bool:
        return (self.rc != 0 and not self.left_running and not self.traceback and self.rerun_rc == 0
                and self.final_step is not None and sorted(set(self.trained)) == list(range(1, self.final_step + 1))
                and self.lost_steps <= self.interval)


def interrupt(run_dir: Path, plugin_dir: Path, layout: str = "single", how: str = "SIGTERM", target: str = "group",
              at_step: int = 5, in_finalize: bool = False, rerun: bool = True, timeout: float = 300,
              rerun_overrides: tuple = ()) -> Outcome:
    """Run ``layout`` until rank(s) pause at ``at_step``, then send ``how`` to ``target`` ('group':
    the whole process group, as SLURM does; 'rank1': that rank only; 'launcher': the process that
    forked the ranks), wait until every process has closed its output, and (``rerun``)
    run the same command again — with ``rerun_overrides`` replacing the keys they name (e.g.
    another parallel layout)."""
    import json

    base, stage, interval = LAYOUTS[layout]
    args = [*base, f"hydra.run.dir={run_dir}", f"++plugins.fault_pause.at_step={-1 if in_finalize or not how else at_step}",
            f"++plugins.fault_pause.in_finalize={in_finalize}"]
    if target == "rank1":
        args.append("++plugins.fault_pause.rank=1")
    stage_dir = Path(run_dir) / stage
    started = time.monotonic()
    proc = start(args, cwd=Path(run_dir).parent, plugin_dir=plugin_dir)
    watched: list[int] = []
    if how:
        marker = stage_dir / ("paused-1" if target == "rank1" else "paused-0")
        if not wait_for(marker, proc, timeout):
            proc.kill()
            raise RuntimeError(f"the run never reached the fault: {proc.communicate()[1][-2000:]}")
        time.sleep(0.3)  # every rank inside its pause
        watched = [proc.pid, *descendants(proc.pid)]
        sig = getattr(signal, how)
        if target == "group":
            os.killpg(proc.pid, sig)
        elif target == "launcher":  # the launching process only: its forked ranks must not live on
            os.kill(proc.pid, sig)
        else:
            os.kill(rank_pids(stage_dir)[1], sig)
    _, err = proc.communicate(timeout=timeout)
    time.sleep(0.2)
    left = [p for p in watched if alive(p)]
    rerun_rc = None
    if rerun:
        keys = {o.split("=", 1)[0] for o in rerun_overrides}
        again = start([a for a in args if a.split("=", 1)[0] not in keys] + list(rerun_overrides),
                      cwd=Path(run_dir).parent, plugin_dir=plugin_dir)
        _, rerr = again.communicate(timeout=timeout)
        rerun_rc = again.returncode
        if rerun_rc != 0:
            err += "\n--- rerun ---\n" + rerr
    metrics = stage_dir / "metrics.json"
    final = None
    if (stage_dir / "checkpoints" / "last.ckpt").exists() and metrics.exists():
        final = json.loads(metrics.read_text()).get("global_step")
    return Outcome(f"{layout}:{how or 'none'}:{target}{':finalize' if in_finalize else ''}", proc.returncode,
                   err[-3000:], left, rerun_rc, trained_steps(stage_dir), final, interval, stage_dir,
                   round(time.monotonic() - started, 1))
