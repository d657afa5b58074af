"""The parallel contract: what a model implements to be trained with ``strategy=hybrid``.

``dsframe/parallel/`` knows no model by name. Everything model-specific — which layers are split
how under tensor parallel, which sizes must divide by tp, where a pipeline may cut and what a
stage looks like — is answered by the model through the methods below (as torchtitan keeps a
``parallelize`` per model). A model from any package gets TP and/or PP by implementing them.

Tensor parallel (``strategy.tp > 1``)::

    def tp_plan(self, sequence_parallel: bool = False) -> dict[str, ParallelStyle]
        # module path (relative to self) -> DTensor ParallelStyle, for parallelize_module.
        # Asked with sequence_parallel=True only if the class says offers_sequence_parallel = True
        # (otherwise the parameter may be left out).
    def tp_divisible(self) -> dict[str, int]
        # config key the user would change -> size tp must divide (heads, hidden, FFN, vocab...)

Pipeline parallel (``strategy.pp > 1``)::

    def pipeline_units(self) -> list[str]
        # the layers, in order, between which a pipeline may cut (at least one per stage)
    def pipeline_stage(self, units: list[str], first: bool, last: bool) -> nn.Module
        # a module holding ``units`` (+ the input end if first, + the output end if last) whose
        # parameter names are the whole model's (so checkpoints are layout-independent); its
        # forward takes the batch tensors of pipeline_inputs() if first, else the previous
        # stage's outputs (a tensor or a tuple of tensors), and returns the logits if last.
        # Under tp > 1 the stage implements tp_plan() too.
    def pipeline_inputs(self, batch: dict) -> tuple[Tensor, ...]
        # what the first stage takes from a batch, positionally (split into micro-batches on dim 0)
    def layer_flops(self, seq_len: int | None) -> dict[str, float]
        # forward FLOPs per token of each unit, plus optional "embed" / "head" costs of the ends;
        # seq_len None: the model's own length. Used to balance the stages (balance=flops); balance=
        # measured times single-unit stages on pipeline_inputs(example batch) instead.
    def pipeline_example(self, batch_size: int, seq_len: int | None) -> dict
        # a batch (same keys as the data's) to measure stage costs on (balance=measured)

The loss stays the task's: the last stage's output goes to ``task.compute_loss(logits,
{"labels": labels})``. dsframe's own models (``dsframe/models/``) implement the contract;
docs/parallel.md has a worked third-party example.
"""
from __future__ import annotations

from typing import Any

from torch import nn

TP_METHODS = ("tp_plan", "tp_divisible")
PP_METHODS = ("pipeline_units", "pipeline_stage", "pipeline_inputs", "layer_flops")


def missing(model: Any, methods: tuple[str, ...]) -> list[str]:
    return [m for m in methods if not callable(getattr(model, m, None))]


def supports_tp(model: Any) -> bool:
    return not missing(model, TP_METHODS)


def supports_pp(model: Any) -> bool:
    return not missing(model, PP_METHODS)


def offers_sequence_parallel(model: Any) -> bool:
    """Whether the model's tp_plan has a sequence-parallel variant (a class attribute it declares)."""
    return bool(getattr(model, "offers_sequence_parallel", False))


def tp_plan(module: nn.Module, sequence_parallel: bool = False) -> dict:
    """The module's plan (a whole model or one of its pipeline stages)."""
    if not callable(getattr(module, "tp_plan", None)):
        raise TypeError(f"{type(module).__name__} has no tp_plan(): it cannot be tensor-parallel")
    if not sequence_parallel:
        return module.tp_plan()
    if not offers_sequence_parallel(module):
        raise ValueError(f"{type(module).__name__} offers no sequence-parallel plan")
    return module.tp_plan(sequence_parallel=True)


def merge_stages(parts: list[nn.Module]) -> nn.Module:
    """One module holding this rank's stages under the whole model's parameter names, for the
    optimizer and for checkpoints; the stages' submodules are shared, not copied, and no stage is
    changed. Where two stages have a submodule of the same name (e.g. each holds some of the
    blocks), a new container holds the children of both."""
    if len(parts) == 1:
        return parts[0]
    merged = _Box()
    for part in parts:
        _graft(merged, part)
    return merged


def _graft(dst: nn.Module, src: nn.Module) -> None:
    for name, child in src._modules.items():
        if child is None:
            continue
        have = dst._modules.get(name)
        if have is None:
            dst._modules[name] = child
            continue
        if have is child:
            continue
        for m in (have, child):
            if m._parameters:
                raise ValueError(f"two pipeline stages both hold the parameters of '{name}': the stages "
                                 f"of pipeline_stage() must partition the model")
        if not isinstance(have, _Box):
            box = _Box()
            _graft(box, have)
            dst._modules[name] = have = box
        _graft(have, child)


class _Box(nn.Module):
    """A container made while merging stages (holds parameters for the optimizer; never called)."""
