"""Surviving interruptions inside a fit stage.

* ``StageGuard`` (a callback the runner adds to every fit) writes ``checkpoints/step-NNNNNNNN.ckpt``
  every ``checkpoint.every_n_steps`` steps and/or ``checkpoint.every_minutes`` minutes, atomically
  (saved under a temporary name, renamed by rank 0 once every rank has written), keeping the last
  ``checkpoint.keep_last``; on SIGTERM/SIGINT it saves one more, writes ``interrupted.json`` and ends
  the fit, and the runner then exits 128 + the signal (143/130), so a scheduler requeues the job.
  It reseeds torch's RNG from (seed, global step) before every batch, so dropout after a resume
  draws what the uninterrupted run drew; the loader's position is in every checkpoint already.
  A non-finite loss stops the stage (naming the step and the last good checkpoint) or, with
  ``nonfinite_loss.policy=skip``, drops that batch's update, up to ``nonfinite_loss.max_skips``.
* ``ContinuingCSVLogger``: a resumed stage appends to ``logs/fit/metrics.csv`` (Lightning's
  CSVLogger deletes it) after dropping the rows logged past the checkpoint it resumes from.
"""
from __future__ import annotations

import csv
import errno
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from dsframe.errors import DsframeError
from dsframe.resilience_config import NONFINITE_POLICIES, CheckpointConfig, NonFiniteLossConfig  # noqa: F401
from dsframe.io import write_json

log = logging.getLogger("dsframe")

INTERRUPT_FILE = "interrupted.json"
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")
SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
# -- process-wide signal handling --------------------------------------------------------------
_pending: list[int] = []  # signals received while deferring


def _defer(signum: int, frame: Any) -> None:
    if _pending and signum == signal.SIGINT:  # Ctrl-C twice: stop now
        raise Interrupted(signum, "interrupted twice (SIGINT): stopped without saving")
    if not _pending:
        log.warning("%s received: saving a checkpoint at the end of this training batch", SIGNALS.get(signum, signum))
    _pending.append(signum)


def _raise(signum: int, frame: Any) -> None:
    raise Interrupted(signum, f"interrupted by {SIGNALS.get(signum, signum)} outside training; finished stages "
                              "are kept: rerun the same command to continue")


def _install(handler: Any) -> None:
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, handler)


def defer_signals() -> None:
    """SIGTERM/SIGINT from now on are recorded; a fit acts on them at its next batch end."""
    _install(_defer)


def raise_on_signals() -> None:
    """SIGTERM/SIGINT from now on stop the run at once (outside a fit: nothing to save)."""
    _install(_raise)


def pending_signal() -> Optional[int]:
    return _pending[0] if _pending else None


def clear_pending_signal() -> None:
    _pending.clear()


class Interrupted(DsframeError):
    """The run was stopped by a signal after saving what it needs to resume; exit 128 + signal."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)


def interval_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(global step, path) of the interval checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


class StageGuard(pl.Callback):
    def __init__(self, stage_dir: Path, stage: str, seed: int, checkpoint: CheckpointConfig,
                 nonfinite: NonFiniteLossConfig):
        self.stage_dir, self.stage, self.seed = Path(stage_dir), stage, seed
        self.ckpt_dir = self.stage_dir / "checkpoints"
        self.config, self.nonfinite = checkpoint, nonfinite
        self._last_save = time.monotonic()
        self._due_at_epoch_end = False
        self._bad_loss = False
        self._freeze_logs_at_epoch_end = False
        self._metric_states: Optional[dict] = None
        self.skipped = 0

    # -- signals: remembered by the handler, acted on at the next batch end by all ranks ------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _end_with_parent()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its SIGTERM handler (it broadcasts from inside the handler,
        # which can deadlock ranks): ours only records the signal. Lightning restores the
        # handler it found (the runner's, also deferring) when the fit ends.
        defer_signals()
        self._last_save = time.monotonic()

    @property
    def signum(self) -> Optional[int]:
        return _pending[0] if _pending else None

    # -- every batch ------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(step_seed(self.seed, trainer.global_step))
        self._bad_loss = False
        if self._metric_states is not None:
            _set_metric_states(pl_module, self._metric_states)
            self._metric_states = None

    # -- the epoch's metric accumulators (torchmetrics keeps them out of the state dict) -----
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["dsframe_metric_states"] = _metric_states(pl_module)
        checkpoint["dsframe_skipped_batches"] = self.skipped

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._metric_states = checkpoint.get("dsframe_metric_states")
        self.skipped = int(checkpoint.get("dsframe_skipped_batches", 0))

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        self._bad_loss = True
        if self.nonfinite.policy == "skip" and self.skipped < self.nonfinite.max_skips:
            self.skipped += 1
            log.warning("stage %s: non-finite training loss at step %d: batch skipped (%d of at most %d)",
                        self.stage, trainer.global_step, self.skipped, self.nonfinite.max_skips)
            return
        last = self.last_good()
        limit = (f" after {self.skipped} skipped batches (nonfinite_loss.max_skips={self.nonfinite.max_skips})"
                 if self.nonfinite.policy == "skip" else "")
        raise DsframeError(
            f"stage '{self.stage}': the training loss is {float(loss.detach().float().mean())} at step "
            f"{trainer.global_step}{limit}; stopped before updating the weights. Last good checkpoint: "
            f"{last if last else 'none yet'} (a rerun resumes from it; lower optim.lr, or set "
            "nonfinite_loss.policy=skip)")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._bad_loss:  # skip policy: no gradient, no update (AdamW leaves such parameters alone)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.signum is not None
        due = bool(self.config.every_n_steps) and trainer.global_step % self.config.every_n_steps == 0
        if self.config.every_minutes and trainer.is_global_zero:
            due = due or time.monotonic() - self._last_save >= 60 * self.config.every_minutes
        if trainer.world_size > 1:  # one decision for all ranks: rank 0's clock, any rank's signal
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            due = trainer.strategy.reduce_boolean_decision(due, all=False)
        if not (stop or due):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Lightning resumes an epoch-end checkpoint correctly, not one taken inside the last batch
            self._due_at_epoch_end = True
            self._stop_at_epoch_end = stop
            return
        self._save(trainer, stop)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._freeze_logs_at_epoch_end:  # the epoch did not end: its aggregates come after the resume
            for logger in trainer.loggers:
                if isinstance(logger, ContinuingCSVLogger):
                    logger.freeze()
        if self._due_at_epoch_end:
            self._due_at_epoch_end = False
            stop = getattr(self, "_stop_at_epoch_end", False) or self.signum is not None
            if trainer.world_size > 1:
                stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            self._save(trainer, stop)

    # -- saving -----------------------------------------------------------------------------
    def last_good(self) -> Optional[Path]:
        found = interval_checkpoints(self.ckpt_dir)
        return found[-1][1] if found else None

    def _save(self, trainer: pl.Trainer, stop: bool) -> None:
        step = trainer.global_step
        final = self.ckpt_dir / f"step-{step:08d}.ckpt"
        tmp = self.ckpt_dir / f".tmp-step-{step:08d}.ckpt"
        if trainer.is_global_zero:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier("dsframe.checkpoint")
        try:
            trainer.save_checkpoint(tmp)  # every rank; ends with a barrier
        except OSError as exc:
            if trainer.is_global_zero:
                _remove(tmp)
            last = self.last_good()
            what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise DsframeError(f"stage '{self.stage}': cannot write checkpoint {final}: {what}; nothing was "
                               f"replaced, the last good checkpoint is {last if last else 'none yet'}") from None
        if trainer.is_global_zero:
            _remove(final)
            os.replace(tmp, final)
            for _, old in interval_checkpoints(self.ckpt_dir)[:-self.config.keep_last]:
                _remove(old)
        self._last_save = time.monotonic()
        log.info("stage %s: checkpoint at step %d: %s", self.stage, step, final)
        if stop:
            self._freeze_logs_at_epoch_end = not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            if trainer.is_global_zero:
                write_json(self.stage_dir / INTERRUPT_FILE, {"signal": SIGNALS.get(self.signum, "SIGTERM"),
                                                             "signum": int(self.signum or signal.SIGTERM),
                                                             "global_step": step, "checkpoint": final})
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # end now; validation keeps its schedule after the resume
        trainer.strategy.barrier("dsframe.checkpoint.done")


def _metric_states(module: torch.nn.Module) -> dict:
    from torchmetrics import Metric

    out = {}
    for name, metric in module.named_modules():
        if isinstance(metric, Metric) and metric._update_count:
            out[name] = {"_update_count": metric._update_count,
                         **{k: getattr(metric, k) for k in metric._defaults}}
    return out


def _set_metric_states(module: torch.nn.Module, states: dict) -> None:
    metrics = dict(module.named_modules())
    for name, state in states.items():
        metric = metrics.get(name)
        if metric is None:
            continue
        for key, value in state.items():
            setattr(metric, key, value)
        metric._computed = None


def _end_with_parent() -> None:
    """A forked rank gets SIGTERM (so it saves and stops) when the launching process dies, even
    by SIGKILL: no rank keeps training, or waits in a collective, as an orphan (Linux only)."""
    import multiprocessing

    if multiprocessing.parent_process() is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if not multiprocessing.parent_process().is_alive():
        os.kill(os.getpid(), signal.SIGTERM)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def take_interruption(stage_dir: Path) -> Optional[dict]:
    """The record a stopped fit left (read once, then removed so a rerun starts clean)."""
    import json

    path = Path(stage_dir) / INTERRUPT_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = {"signum": int(signal.SIGTERM), "signal": "SIGTERM"}
    path.unlink()
    return record


# -- logs that continue ------------------------------------------------------------------------
class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before_step: Optional[int]):
        path = Path(log_dir) / self.NAME_METRICS_FILE
        rows, header = [], []
        if keep_before_step is not None and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") not in (None, "") and int(r["step"]) < keep_before_step]
        path.unlink(missing_ok=True)  # a fresh start of the stage (or segment) starts a fresh file
        super().__init__(log_dir)
        if header:
            self.metrics_keys = sorted(header)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)


    def _check_log_dir_exists(self) -> None:
        pass  # Lightning's version deletes metrics.csv and warns: the rows to keep are handled above


class ContinuingCSVLogger(CSVLogger):
    """A CSVLogger whose fixed version folder continues a resumed stage's metrics.csv: the rows
    before ``resume_step`` are kept (those a killed run logged after its checkpoint are redone)."""

    def __init__(self, *args: Any, resume_step: Optional[int] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step
        self._frozen = False

    def freeze(self) -> None:
        """Write what is logged so far and ignore the rest: a fit stopped by a signal still ends
        its epoch (Lightning logs epoch aggregates then), rows the resumed fit will log again."""
        self.save()
        self._frozen = True

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        if not self._frozen:
            super().log_metrics(metrics, step)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            from lightning.pytorch.utilities import rank_zero_only

            if rank_zero_only.rank != 0:
                return super().experiment
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._resume_step)
        return self._experiment
