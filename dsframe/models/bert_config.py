"""Options of ``model=bert``. No torch here: a wrong option (heads that do not divide the hidden
size included) is reported at once, not when transformers builds the model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict

from dsframe.checks import unit_fractions
from dsframe.errors import ConfigError
from dsframe.models import hub

POOLINGS = ("mean", "cls")
ATTENTIONS = ("sdpa", "eager")


@dataclass
class BertConfig:
    description: ClassVar[str] = "BERT-family encoder (default: packaged MiniLM-L6) with a classification head"
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
        unit_fractions(self, "model", ("dropout",))
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
