"""Distributed checkpoints (torch.distributed.checkpoint) across parallel layouts.

:class:`HybridParallelStrategy` saves a folder: one DCP shard file per rank holding its part of
``{"state_dict": task weights, "optimizer_0": ...}`` (TP shards as DTensors, pipeline stages as
disjoint keys, dp replicas deduplicated) plus Lightning's ``meta.pt`` (epoch, loops, ...).
Parameter names are those of the whole model whatever the layout, so DCP reshards on load:

* :func:`load_distributed` — resume inside a strategy (same layout, or another one);
* :func:`load_model_weights` — one process, no process group: a plain module from any layout's
  checkpoint (e.g. a tp=2 run → one process).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

META = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


def is_distributed_checkpoint(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def load_distributed(path: Path, module: nn.Module, optimizers: list, strict: bool = True,
                     weights_only: Optional[bool] = None) -> dict[str, Any]:
    """Load weights and optimizer states into this rank's (sharded / staged) ``module``; collective.
    Returns Lightning's remaining checkpoint metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from dsframe.errors import CheckpointError

    if not is_distributed_checkpoint(path):
        raise CheckpointError(f"{path} is not a distributed checkpoint folder (no .metadata)")
    state = {"state_dict": get_model_state_dict(module)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=strict))
    for idx, opt in enumerate(optimizers):
        opt = getattr(opt, "_optimizer", opt)
        osd = {f"optimizer_{idx}": get_optimizer_state_dict(module, opt)}
        dcp.load(osd, checkpoint_id=path)
        set_optimizer_state_dict(module, opt, optim_state_dict=osd[f"optimizer_{idx}"])
    meta = torch.load(path / META, weights_only=True if weights_only is None else weights_only)
    meta.pop("state_dict", None)
    return meta


def load_model_weights(path, model: nn.Module, prefix: str = "model.") -> nn.Module:
    """Fill a whole, unsharded ``model`` from a DCP checkpoint folder of any layout, in one process.

    ``prefix`` is the task's attribute holding the model in the saved names (``model.``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from dsframe.errors import CheckpointError

    path = Path(path)
    if not is_distributed_checkpoint(path):
        raise CheckpointError(f"{path} is not a distributed checkpoint folder (no .metadata)")
    own = model.state_dict()
    state = {"state_dict": {prefix + k: torch.empty_like(v) for k, v in own.items()}}
    try:
        dcp.load(state, checkpoint_id=path, no_dist=True)
    except (Exception, CheckpointException) as exc:  # missing keys, shape mismatch: another architecture
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: {exc}") from exc
    model.load_state_dict({k[len(prefix):]: v for k, v in state["state_dict"].items()})
    return model
