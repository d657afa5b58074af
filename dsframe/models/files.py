"""Model artifacts: save a model with the architecture needed to rebuild it, load it back.

A dsframe model is an ``nn.Module`` registered in the entry-point group ``dsframe.models``
that provides ``arch() -> dict`` (JSON-able, read from the actual module shapes, so a
physically pruned model records its own smaller shapes) and ``from_arch(arch)``.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from dsframe import registry
from dsframe.errors import CheckpointError
from dsframe.io import atomic_write

FORMAT = "dsframe-model/1"


def model_kind(model: nn.Module) -> str:
    kind = getattr(model, "kind", None)
    if not kind:
        raise TypeError(f"{type(model).__name__} has no `kind`: it is not a registered dsframe model")
    return kind


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    payload = {
        "format": FORMAT,
        "kind": model_kind(model),
        "arch": model.arch(),
        "meta": meta or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_model_file(path: str | os.PathLike) -> dict:
    """The raw payload of a model file, checked; raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"corrupt model file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dsframe model file (expected format {FORMAT})")
    return payload


def load_model(path: str | os.PathLike, expect_kind: str | None = None) -> nn.Module:
    payload = read_model_file(path)
    kind = payload["kind"]
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointError(f"{path} holds a '{kind}' model, expected '{expect_kind}'")
    cls = registry.models.get(kind, key="model.kind")
    model = cls.from_arch(payload["arch"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the recorded architecture: "
                              f"{str(exc).splitlines()[0]}") from None
    return model


def file_size_mb(path: str | os.PathLike) -> float:
    return os.path.getsize(path) / 2**20
