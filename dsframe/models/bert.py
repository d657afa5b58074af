"""BERT-family encoder with a classification head.

``arch()`` reads the per-layer number of attention heads and FFN width from the actual
module shapes, so a model whose heads or channels were physically removed rebuilds at its
own (smaller) size from a saved file; ``from_arch`` makes modules of those shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict

import torch
from torch import nn

from dsframe.errors import ConfigError
from dsframe.models import hub

POOLINGS = ("mean", "cls")
ATTENTIONS = ("sdpa", "eager")


@dataclass
class BertConfig:
    kind: str = "bert"
    name_or_path: str = "minilm"  # 'minilm' = the packaged all-MiniLM-L6-v2; or a HF id / folder
    num_labels: int = 2
    pretrained: bool = True  # False: same architecture, random weights (shape benchmarks)
    dropout: float = 0.1
    pooling: str = "mean"
    attn_implementation: str = "sdpa"
    # overrides of the transformers config, e.g. {num_hidden_layers: 2} for a small random model
    hf_config: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_labels < 2:
            raise ConfigError("model.num_labels", self.num_labels, "an integer >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", self.dropout, "a float in [0, 1)")
        if self.pooling not in POOLINGS:
            raise ConfigError("model.pooling", self.pooling, f"one of {', '.join(POOLINGS)}")
        if self.attn_implementation not in ATTENTIONS:
            raise ConfigError("model.attn_implementation", self.attn_implementation,
                              f"one of {', '.join(ATTENTIONS)}")
        self._check_shape()

    def _check_shape(self) -> None:
        """hidden_size must split evenly into heads; checked at config time (transformers would only
        say so when the model is built) from the local config.json, when there is one."""
        base = _local_hf_config(self.name_or_path)
        hidden = self.hf_config.get("hidden_size", base.get("hidden_size"))
        heads = self.hf_config.get("num_attention_heads", base.get("num_attention_heads"))
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
            value = self.hf_config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"model.hf_config.{key}", value, "an integer >= 1")
        if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
            key = "num_attention_heads" if "num_attention_heads" in self.hf_config else "hidden_size"
            raise ConfigError(f"model.hf_config.{key}", self.hf_config.get(key, hidden if key == "hidden_size" else heads),
                              f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}): "
                              f"e.g. num_attention_heads in {', '.join(str(d) for d in _divisors(hidden))}")


def _local_hf_config(name_or_path: str) -> dict:
    import json
    import os

    try:
        path = os.path.join(hub.resolve(name_or_path), "config.json")
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError, ConfigError):
        return {}  # a hub id or a missing package: transformers checks it when the model is built


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


class BertClassifier(nn.Module):
    """A transformers ``BertModel`` + dropout + linear head over the pooled sequence."""

    kind: ClassVar[str] = "bert"
    description: ClassVar[str] = "BERT-family encoder (default: packaged MiniLM-L6) with a classification head"
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
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


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
