"""Ranks of a multi-process job started by a cluster launcher (hydra-submitit-launcher).

Under ``hydra/launcher=slurm`` (submitit on SLURM), ``srun`` starts one task per rank; Lightning's
``SLURMEnvironment`` reads the ranks from SLURM's environment (``SLURM_PROCID``, ``SLURM_LOCALID``,
``SLURM_NTASKS``, ``SLURM_NODELIST``) and the strategy must not start ranks of its own
(``dsframe.strategies.ranks_started_externally``). submitit's *local* executor
(``hydra/launcher=slurm_local``) starts the tasks the same way but describes them in
``SUBMITIT_LOCAL_*`` variables, which no Lightning environment reads: :class:`SubmititRanks`, a Hydra
callback on by default, writes them out as the torch.distributed variables (``RANK``, ``LOCAL_RANK``,
``NODE_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) that Lightning's default environment
takes, before the job imports Lightning.
"""
from __future__ import annotations

import os
import sys
import zlib

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


def submitit_local_ranks(environ=os.environ) -> dict[str, str]:
    """The torch.distributed variables of a task of submitit's local executor ({} elsewhere, or for a
    one-task job, or when a launcher already set them)."""
    if environ.get("SUBMITIT_EXECUTOR") != "local" or "LOCAL_RANK" in environ:
        return {}
    tasks = int(environ.get("SUBMITIT_LOCAL_NTASKS", "1"))
    if tasks <= 1:
        return {}
    job_id = environ.get("SUBMITIT_LOCAL_JOB_ID", "0")
    return {
        "RANK": environ.get("SUBMITIT_LOCAL_GLOBALID", "0"),
        "LOCAL_RANK": environ.get("SUBMITIT_LOCAL_LOCALID", "0"),
        "NODE_RANK": environ.get("SUBMITIT_LOCAL_NODEID", "0"),
        "WORLD_SIZE": str(tasks * int(environ.get("SUBMITIT_LOCAL_JOB_NUM_NODES", "1"))),
        "MASTER_ADDR": "127.0.0.1",
        # every task of the job derives the same port from the job id (Lightning's SLURM environment
        # does the same with SLURM_JOB_ID)
        "MASTER_PORT": str(15000 + zlib.crc32(job_id.encode()) % 20000),
    }


class SubmititRanks(_HydraCallback):
    """Hydra callback: a task of submitit's local executor gets its rank before the job runs."""

    def on_job_start(self, config, **kwargs) -> None:
        ranks = submitit_local_ranks()
        if not ranks:
            return
        os.environ.update(ranks)
        if "lightning" in sys.modules:  # imported already: its rank-zero guard read the environment then
            from lightning.pytorch.utilities import rank_zero_only

            rank_zero_only.rank = int(ranks["RANK"])
