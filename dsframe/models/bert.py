"""BERT-family encoder with a classification head.

``arch()`` reads the per-layer number of attention heads and FFN width from the actual
module shapes, so a model whose heads or channels were physically removed rebuilds at its
own (smaller) size from a saved file; ``from_arch`` makes modules of those shapes.

It implements the parallel contract (:mod:`dsframe.parallel.contract`): a Megatron tensor-parallel
plan of the encoder layers, and pipeline stages (:class:`BertStage`) cut between layers.
"""
from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
from torch import nn

from dsframe.errors import ConfigError
from dsframe.models import hub
from dsframe.models.bert_config import BertConfig


class BertClassifier(nn.Module):
    """A transformers ``BertModel`` + dropout + linear head over the pooled sequence."""

    kind: ClassVar[str] = "bert"
    description: ClassVar[str] = BertConfig.description
    Config: ClassVar[type] = BertConfig

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, config: BertConfig) -> "BertClassifier":
        from transformers import BertModel

        kwargs = dict(add_pooling_layer=False, attn_implementation=config.attn_implementation)
        hf_config = hub.load_hf_config(config.name_or_path)
        for key, value in config.hf_config.items():
            if not hasattr(hf_config, key):
                raise ConfigError(f"model.hf_config.{key}", value, f"a field of {type(hf_config).__name__}")
            setattr(hf_config, key, value)
        if config.pretrained:
            encoder = hub.load_hf_model(BertModel, config.name_or_path, config=hf_config, **kwargs)
        else:
            hf_config._attn_implementation = config.attn_implementation
            try:
                encoder = BertModel(hf_config, add_pooling_layer=False)
            except ValueError as exc:  # shapes transformers rejects
                raise ConfigError("model.hf_config", dict(config.hf_config), str(exc).splitlines()[0]) from None
        if getattr(encoder.config, "model_type", "bert") != "bert":
            raise ConfigError("model.name_or_path", config.name_or_path,
                              f"a BERT-family model; this one is '{encoder.config.model_type}'")
        return cls(encoder, config.num_labels, config.pooling, config.dropout)

    @classmethod
    def from_arch(cls, arch: dict) -> "BertClassifier":
        from transformers import BertConfig as HFBertConfig, BertModel

        hf = HFBertConfig.from_dict(arch["hf_config"])
        hf._attn_implementation = arch.get("attn_implementation", "sdpa")
        encoder = BertModel(hf, add_pooling_layer=False)
        model = cls(encoder, arch["num_labels"], arch["pooling"], arch["dropout"])
        for layer, heads, ffn in zip(encoder.encoder.layer, arch["heads"], arch["ffn"]):
            _resize_layer(layer, heads, ffn)
        return model

    def arch(self) -> dict:
        layers = self.encoder.encoder.layer
        hf = self.encoder.config.to_dict()
        hf["vocab_size"] = self.encoder.embeddings.word_embeddings.num_embeddings
        hf["num_hidden_layers"] = len(layers)
        return {
            "hf_config": hf,
            "num_labels": self.classifier.out_features,
            "pooling": self.pooling,
            "dropout": self.dropout.p,
            "attn_implementation": self.encoder.config._attn_implementation,
            "heads": [layer_heads(layer) for layer in layers],
            "ffn": [layer.intermediate.dense.out_features for layer in layers],
        }

    # -- forward ------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        return self.classifier(self.dropout(_pool(hidden, attention_mask, self.pooling)))


    # -- parallel contract (dsframe.parallel.contract) ------------------------------------
    def _layers(self) -> list[tuple[str, nn.Module]]:
        return [(str(i), layer) for i, layer in enumerate(self.encoder.encoder.layer)]

    def tp_plan(self) -> dict:      # no sequence-parallel variant (offers_sequence_parallel unset)
        return _tp_plan(self._layers())

    def tp_divisible(self) -> dict[str, int]:
        # gcd over layers: divisible by tp <=> every (possibly pruned) layer's count is. Only heads
        # and FFN channels are split; hidden size and vocabulary stay whole on every rank.
        layers = [layer for _, layer in self._layers()]
        return {"model.hf_config.num_attention_heads": math.gcd(*(layer_heads(la) for la in layers)),
                "model.hf_config.intermediate_size": math.gcd(*(la.intermediate.dense.out_features
                                                                for la in layers))}

    def pipeline_units(self) -> list[str]:
        return [name for name, _ in self._layers()]

    def pipeline_stage(self, units: list[str], first: bool, last: bool) -> "BertStage":
        return BertStage(self, units, first, last)

    def pipeline_inputs(self, batch: dict) -> tuple:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        return ids, (torch.ones_like(ids) if mask is None else mask)

    def pipeline_example(self, batch_size: int, seq_len: int | None = None) -> dict:
        T = seq_len or 128
        vocab = self.encoder.embeddings.word_embeddings.num_embeddings
        return {"input_ids": torch.randint(0, vocab, (batch_size, T)),
                "attention_mask": torch.ones(batch_size, T, dtype=torch.long)}

    def layer_flops(self, seq_len: int | None = None) -> dict[str, float]:
        """Forward FLOPs per token: projections, attention scores and values, FFN; the head is
        the pooling and the classifier."""
        T = seq_len or 128
        hidden = self.encoder.config.hidden_size
        out = {}
        for name, layer in self._layers():
            w = layer.attention.self.query.out_features
            ffn = layer.intermediate.dense.out_features
            out[name] = float(2 * (3 * hidden * w + w * hidden) + 4 * T * w + 4 * hidden * ffn)
        out["embed"] = float(8 * hidden)
        out["head"] = float(2 * hidden * self.classifier.out_features + 2 * hidden)
        return out


class BertStage(nn.Module):
    """Layers ``units`` of a :class:`BertClassifier` (+ embeddings if first, + pooling and classifier
    if last), under the whole model's parameter names (``encoder.encoder.layer.3...``). Stages pass
    ``(hidden states, attention mask)``: every layer needs the padding mask."""

    def __init__(self, full: BertClassifier, units: list[str], first: bool, last: bool):
        super().__init__()
        self.config = full.encoder.config
        self.pooling = full.pooling
        self.first, self.last = first, last
        self.encoder = nn.Module()
        if first:
            self.encoder.embeddings = copy.deepcopy(full.encoder.embeddings)
        self.encoder.encoder = nn.Module()
        self.encoder.encoder.layer = nn.ModuleDict({u: copy.deepcopy(full.encoder.encoder.layer[int(u)])
                                                    for u in units})
        if last:
            self.dropout = copy.deepcopy(full.dropout)
            self.classifier = copy.deepcopy(full.classifier)

    def forward(self, x, attention_mask):
        from transformers.masking_utils import create_bidirectional_mask

        hidden = self.encoder.embeddings(input_ids=x) if self.first else x
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.encoder.encoder.layer.values():
            hidden = layer(hidden, mask)
        if not self.last:
            return hidden, attention_mask
        return self.classifier(self.dropout(_pool(hidden, attention_mask, self.pooling)))

    def tp_plan(self) -> dict:
        return _tp_plan(list(self.encoder.encoder.layer.items()))


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _tp_plan(layers: list[tuple[str, nn.Module]]) -> dict:
    """Megatron-style plan of the encoder layers. Per layer: query/key/value column-wise (whole heads
    per rank — transformers' BERT reshapes with ``view(*shape, -1, head_size)``, so n_head/tp local
    heads need no patch), attention output dense row-wise; FFN intermediate column-wise, output
    dense row-wise. Embeddings, LayerNorms, pooling and the classifier stay replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict = {}
    for name, _ in layers:
        p = f"encoder.encoder.layer.{name}"
        for sub in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense"):
            plan[f"{p}.{sub}"] = ColwiseParallel()
        plan[f"{p}.attention.output.dense"] = RowwiseParallel()
        plan[f"{p}.output.dense"] = RowwiseParallel()
    return plan


def layer_heads(layer: nn.Module) -> int:
    attn = layer.attention.self
    return attn.query.out_features // attn.attention_head_size


def _resize_layer(layer: nn.Module, heads: int, ffn: int) -> None:
    """Give one encoder layer ``heads`` attention heads and an FFN of width ``ffn`` (fresh weights)."""
    attn = layer.attention.self
    hidden = attn.query.in_features
    width = heads * attn.attention_head_size
    if width != attn.query.out_features:
        for name in ("query", "key", "value"):
            setattr(attn, name, nn.Linear(hidden, width))
        layer.attention.output.dense = nn.Linear(width, hidden)
        attn.num_attention_heads = heads
        attn.all_head_size = width
    if ffn != layer.intermediate.dense.out_features:
        layer.intermediate.dense = nn.Linear(hidden, ffn)
        layer.output.dense = nn.Linear(ffn, hidden)
