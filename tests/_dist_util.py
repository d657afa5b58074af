"""Forked gloo ranks for tests that exercise torch.distributed directly (no Lightning)."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, init_file: str, body: Callable, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        body(rank, world, out)
    finally:
        dist.destroy_process_group()


def run_forked(body: Callable[[int, int, str], None], world: int, tmp_path: Path) -> str:
    """Run ``body(rank, world, out)`` in ``world`` forked ranks joined in one gloo group; returns
    ``out``, the file path the ranks may write their result to."""
    out = str(tmp_path / "out.pt")
    mp.start_processes(_rank, args=(world, str(tmp_path / "init"), body, out), nprocs=world, start_method="fork")
    return out
