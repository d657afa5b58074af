"""The loaders every data module uses.

The training loader of every ``SplitDataModule`` batches through a ``ResizableBatchSampler``:
its batch size can change in the middle of an epoch (``resize_batch``), and its position in the
epoch is part of the Lightning checkpoint, so a resumed run — or the next segment of a stage
with other trainer settings, other world size included — continues where the last one stopped:
no sample trained twice in an epoch, none skipped.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """Stands for the dataset's indices on one process; Lightning replaces it with a
    ``DistributedSampler`` under several ranks. Either way ``ResizableBatchSampler`` reads only
    its length, ``epoch`` and (distributed) rank and replica count: the order is its own."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class ResizableBatchSampler(BatchSampler):
    """Batches of a seeded per-epoch permutation of the whole dataset, taken in *global* batches
    of ``batch_size × ranks`` samples; rank r gets its slice. Because the position is a global
    sample offset, a change of batch size or of rank count mid-epoch continues the same order.

    ``mark_consumed(batch_idx)`` (the task calls it as each batch starts training) separates the
    batches trained on from those a loader prefetched; ``state_dict`` records only the former.
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False, *,
                 shuffle: bool = True, seed: int = 0):
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), drop_last
        self.shuffle, self.seed = shuffle, seed
        self.epoch = -1          # epoch whose order `offset` refers to
        self.offset = 0          # global samples of this epoch trained on (consumed)
        self.batches = 0         # batches of this epoch trained on
        self._ends: dict[int, int] = {}  # batch index -> global offset after it, for yielded batches
        self.next_global_batch: Optional[int] = None  # the global batch a next segment starts with

    # -- layout -----------------------------------------------------------------------------
    @property
    def n(self) -> int:
        dataset = getattr(self.sampler, "dataset", None)
        return len(dataset) if dataset is not None else len(self.sampler)

    @property
    def ranks(self) -> tuple[int, int]:
        """(this rank, number of ranks) of the sampler Lightning gave us."""
        return int(getattr(self.sampler, "rank", 0)), int(getattr(self.sampler, "num_replicas", 1))

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _sync_epoch(self) -> None:
        # a new epoch, or the saved one was over; a resumed run keeps its offset in its epoch
        epoch = int(getattr(self.sampler, "epoch", 0))
        if epoch != self.epoch or self.offset >= self.n:
            self.epoch, self.offset, self.batches = epoch, 0, 0

    def set_batch_size(self, batch_size: int) -> None:
        """Takes effect from the next batch the sampler yields (a prefetched one keeps its size)."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)

    def mark_consumed(self, batch_idx: int) -> None:
        if batch_idx in self._ends:
            self.offset, self.batches = self._ends[batch_idx], batch_idx + 1

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        self._sync_epoch()
        order, (rank, world) = self._order(self.epoch), self.ranks
        start, idx = self.offset, self.batches
        self._ends = {}
        while start < self.n:
            size = self.batch_size * world  # read every batch: a resize applies to the next one
            chunk = order[start:start + size]
            if len(chunk) < size and self.drop_last:
                return
            end = start + len(chunk)
            if len(chunk) < world:  # every rank needs a sample: pad from the epoch's start
                chunk = chunk + order[:world - len(chunk)]
            per = math.ceil(len(chunk) / world)
            mine = chunk[rank * per:(rank + 1) * per] or chunk[-1:]
            self._ends[idx] = end
            yield mine
            start, idx = end, idx + 1

    def __len__(self) -> int:
        """Batches in this epoch at the current batch size, counting those already trained on
        (Lightning numbers batches from the epoch's start) and those yielded ahead of training
        (prefetched: they keep the size they were cut at)."""
        size = self.batch_size * self.ranks[1]
        if self.offset >= self.n:  # this epoch is over (a checkpoint at its last batch): no more batches
            return self.batches
        ahead = max(self._ends) if self._ends else -1
        if ahead >= self.batches:
            return ahead + 1 + self._count(self.n - self._ends[ahead], size)
        return self.batches + self._count(self.n - self.offset, size)

    def _count(self, samples: int, size: int) -> int:
        return samples // size if self.drop_last else math.ceil(samples / size)

    # -- checkpoint -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # the *global* batch: a change of rank count keeps it (per-rank batch = global / ranks)
        return {"epoch": self.epoch, "offset": self.offset, "batches": self.batches,
                "global_batch_size": self.next_global_batch or self.batch_size * self.ranks[1], "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") not in (None, self.n):
            return  # another dataset: start its epoch afresh
        self.epoch, self.offset, self.batches = state["epoch"], state["offset"], state["batches"]
        self._ends = {}
        self.batch_size = max(1, int(state["global_batch_size"]) // self.ranks[1])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose batch sampler's position is saved in and restored from the Lightning
    checkpoint (Lightning calls ``state_dict``/``load_state_dict`` of a train loader that has them)."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict() if hasattr(self.batch_sampler, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if state and hasattr(self.batch_sampler, "load_state_dict"):
            self.batch_sampler.load_state_dict(state)


def train_batch_sampler(trainer: pl.Trainer) -> Optional[ResizableBatchSampler]:
    """The resizable batch sampler of the loader the trainer is training on, if it has one."""
    loop = trainer.fit_loop
    loaders = loop._combined_loader.flattened if loop._combined_loader is not None else []
    for loader in loaders:
        sampler = getattr(loader, "batch_sampler", None)
        if isinstance(sampler, ResizableBatchSampler):
            return sampler
    return None


def resize_batch(trainer: pl.Trainer, batch_size: int, ranks: Optional[int] = None) -> bool:
    """Change the per-rank training batch size from the next batch on, mid-epoch. Returns False
    when the training loader cannot (it has no ``ResizableBatchSampler``).

    ``ranks``: the size is meant for a next segment on that many ranks (``end_segment(devices=
    ...)``); only the saved position records it (a change of rank count otherwise keeps the
    global batch)."""
    sampler = train_batch_sampler(trainer)
    if sampler is None:
        return False
    if ranks is not None and ranks != sampler.ranks[1]:
        sampler.next_global_batch = int(batch_size) * int(ranks)
        return True
    sampler.set_batch_size(batch_size)
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and hasattr(dm, "batch_size"):
        dm.batch_size = batch_size  # a reloaded loader starts at the new size
    sync_epoch_length(trainer)
    return True


def sync_epoch_length(trainer: pl.Trainer) -> None:
    """Lightning fixes an epoch's length in batches when it sets the loader up (before it restores
    the loader's position) and reuses it every epoch; a resizable loader's length changes with
    its batch size and position. Recompute it so the epoch ends exactly when the data does.
    The task calls this when training starts (after the position is restored) and as every
    batch starts (Lightning skips ``on_train_epoch_start`` after some restarts); ``resize_batch`` too."""
    sampler = train_batch_sampler(trainer)
    loop = trainer.fit_loop
    if sampler is None or len(loop._combined_loader.flattened) != 1:
        return
    n, limit = len(sampler), trainer.limit_train_batches
    if isinstance(limit, int) and not isinstance(limit, bool):
        n = min(n, limit)
    elif float(limit) < 1.0:
        n = int(n * float(limit))
    loop._combined_loader.limits = [n]
    loop.max_batches = n
    fetcher = loop._data_fetcher
    if fetcher is not None and fetcher.length is not None:
        fetcher.length = n


class SplitDataModule(pl.LightningDataModule):
    """train/val/test loaders over ``self._loader(split, batch_size, shuffle)``.

    The training loader is rebuilt around a ``ResizableBatchSampler`` (same dataset, collate,
    workers and ``drop_last``; order seeded by the run's seed), so for every data module the
    batch size can change mid-epoch and the position survives a checkpoint. ``batch_size`` is a
    plain attribute read by ``train_dataloader``; evaluation uses ``config.eval_batch_size``.
    """

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        raise TypeError(f"{type(self).__name__} must define _loader(split, batch_size, shuffle)")

    def train_dataloader(self):
        return resizable(self._loader("train", self.batch_size, shuffle=True), shuffle=True)

    def val_dataloader(self):
        return self._loader("val", self.config.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader("test", self.config.eval_batch_size, shuffle=False)


def resizable(loader: DataLoader, shuffle: bool = True, seed: Optional[int] = None) -> ResumableDataLoader:
    """``loader`` rebuilt to batch through a ``ResizableBatchSampler``. The order is seeded by
    ``seed``, by default the run's (``PL_GLOBAL_SEED``, which ``seed_everything`` sets), so every
    rank and every segment of a stage draws the same permutation."""
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    sampler = ResizableBatchSampler(EpochSampler(len(loader.dataset)), loader.batch_size or 1,
                                    drop_last=loader.drop_last, shuffle=shuffle, seed=seed)
    return ResumableDataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn,
                               num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                               persistent_workers=loader.persistent_workers)
