"""Options of ``model=gpt``. No torch here: a wrong option is reported at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dsframe.checks import integers_at_least, unit_fractions
from dsframe.errors import ConfigError


@dataclass
class GPTConfig:
    description: ClassVar[str] = "GPT-style decoder LM (nanoGPT layout, TP plan + pipeline stages)"
    kind: str = "gpt"
    vocab_size: int = 256        # 256 = byte-level tokens
    block_size: int = 128        # longest sequence
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self):
        integers_at_least(self, "model", ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
        if self.n_embd % self.n_head:
            raise ConfigError("model.n_embd", self.n_embd, f"a multiple of model.n_head={self.n_head}")
        unit_fractions(self, "model", ("dropout",))
