"""Tensor-parallel plans of dsframe's transformer models, looked up by model kind.

A plan maps module names to DTensor ``ParallelStyle`` s for ``parallelize_module``. The GPT plan
lives next to the model (:func:`dsframe.models.gpt.tp_plan`); the BERT encoder's is here because
``dsframe/models/bert.py`` wraps a transformers ``BertModel`` it does not own.

A third-party model provides its own plan with a method ``tp_plan(self) -> dict``.
"""
from __future__ import annotations

import math

from torch import nn


def bert_tp_plan(model: nn.Module) -> dict:
    """Megatron-style plan for :class:`dsframe.models.bert.BertClassifier`'s encoder.

    Per layer: query/key/value column-wise (whole heads per rank — transformers' BERT reshapes with
    ``view(*shape, -1, head_size)``, so n_head/tp local heads need no patch), attention output dense
    row-wise; FFN intermediate column-wise, output dense row-wise. Embeddings, LayerNorms, pooling
    and the classifier stay replicated.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict = {}
    for i, _ in enumerate(model.encoder.encoder.layer):
        p = f"encoder.encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "intermediate.dense"):
            plan[f"{p}.{name}"] = ColwiseParallel()
        plan[f"{p}.attention.output.dense"] = RowwiseParallel()
        plan[f"{p}.output.dense"] = RowwiseParallel()
    return plan


def tp_plan_for(model: nn.Module, **options) -> dict:
    """The tensor-parallel plan of a dsframe model (GPT, BERT, or one that defines ``tp_plan``).
    ``options`` (e.g. ``sequence_parallel=True``) go to plans that offer them."""
    if hasattr(model, "tp_plan"):
        return model.tp_plan(**options)
    kind = getattr(model, "kind", None)
    if kind == "gpt":
        from dsframe.models.gpt import tp_plan
        return tp_plan(model, **options)
    if options:
        raise TypeError(f"the tensor-parallel plan of {kind!r} takes no options ({', '.join(options)})")
    if kind == "bert":
        return bert_tp_plan(model)
    raise TypeError(f"{type(model).__name__} (kind={kind!r}) has no tensor-parallel plan: "
                    f"give it a method tp_plan(self) -> dict of module name -> ParallelStyle")


def bert_dims(model: nn.Module) -> dict:
    """Dims of a BertClassifier for :meth:`ParallelDims.validate_model`."""
    cfg = model.encoder.config
    layers = model.encoder.encoder.layer
    heads = [layer.attention.self.query.out_features // layer.attention.self.attention_head_size
             for layer in layers]
    # gcd: divisible by tp ⇔ every (possibly pruned) layer's count is; the vocabulary is not split
    return {"n_layer": len(layers), "n_head": math.gcd(*heads), "n_embd": cfg.hidden_size,
            "ffn": math.gcd(*(layer.intermediate.dense.out_features for layer in layers))}
