"""The batch format every task, strategy and plugin shares.

A batch is a flat ``dict`` of tensors whose first dimension is the batch: ``labels`` (the
targets) plus whatever inputs the data module produces — ``input_ids``/``attention_mask`` for
text, ``image``, ``audio``, a ``present`` mask for multimodal samples, and so on. Nothing here
assumes which inputs exist: a model names the inputs it takes in its ``forward`` signature and
receives exactly those.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn

LABELS = "labels"


def batch_size(batch: Mapping[str, Any]) -> int:
    """Samples in a batch: the length of ``labels``, else of the first tensor in it."""
    labels = batch.get(LABELS)
    if isinstance(labels, torch.Tensor) and labels.ndim:
        return int(labels.shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    raise ValueError(f"batch holds no tensor with a batch dimension (keys: {', '.join(batch) or 'none'})")


def accepted_inputs(model: nn.Module) -> set[str] | None:
    """Names of the batch keys ``model.forward`` takes; None when it takes ``**kwargs`` (all inputs)."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def model_inputs(batch: Mapping[str, Any], accepted: set[str] | None) -> dict[str, Any]:
    """The part of ``batch`` a model with these ``accepted`` inputs is called with."""
    if accepted is None:
        return {k: v for k, v in batch.items() if k != LABELS}
    return {k: v for k, v in batch.items() if k in accepted}


def call_model(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """``model(**inputs)`` with the batch keys its forward names (for teachers, scorers, probes)."""
    return model(**model_inputs(batch, accepted_inputs(model)))
