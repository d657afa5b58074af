"""qat: 8-bit quantization-aware training with torchao (prepare -> train -> convert).

``transform`` swaps every ``nn.Linear`` for torchao's ``FakeQuantizedLinear``
(int8 weights per output channel, symmetric; int8 activations per token, dynamic) and,
with ``embeddings: true``, every ``nn.Embedding`` for a fake-quantized one (int8 per row).
``finalize`` bakes the fake-quantized weights into the fp32 tensors (they then lie exactly
on the int8 grid) and converts back to plain ``nn.Linear`` / ``nn.Embedding``, so the stage's
model file is an ordinary dsframe model. The real int8 model is made from it by the
``export`` stage (onnxruntime int8 kernels, per-channel symmetric weights = the QAT grid) or
by ``dsframe_compress.int8.torch_dynamic_int8``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List

import torch
from torch import nn

from dsframe.errors import ConfigError, DsframeError
from dsframe.plugin import Plugin

__all__ = ["QATPlugin", "QatConfig", "prepare_qat", "convert_qat"]

_GRAN = ("per_token", "per_tensor")


@dataclass
class QatConfig:
    bits: int = 8                   # only 8 is supported (int8 kernels downstream)
    activations: str = "per_token"  # per_token | per_tensor | none
    embeddings: bool = True         # fake-quantize embedding tables (int8 per row)
    skip: List[str] = field(default_factory=list)  # module-name prefixes left unquantized

    def __post_init__(self):
        if self.bits != 8:
            raise ConfigError("plugins.qat.bits", self.bits, "8 (int8 is what the CPU kernels run)")
        if self.activations not in (*_GRAN, "none"):
            raise ConfigError("plugins.qat.activations", self.activations, "one of per_token, per_tensor, none")
        self.skip = list(self.skip)


def _fq_classes():
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear
    return FakeQuantizedLinear, FakeQuantizedEmbedding


def prepare_qat(model: nn.Module, activations: str = "per_token", embeddings: bool = True,
                skip: tuple = ()) -> nn.Module:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    FQL, FQE = _fq_classes()
    if any(isinstance(m, (FQL, FQE)) for m in model.modules()):
        raise DsframeError("plugin 'qat': the model is fake-quantized already (list qat once per stage)")
    w_cfg = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    a_cfg = None if activations == "none" else IntxFakeQuantizeConfig(torch.int8, activations, is_symmetric=False)

    def keep(fqn: str) -> bool:
        return not any(fqn == s or fqn.startswith(s + ".") for s in skip)

    quantize_(model, QATConfig(activation_config=a_cfg, weight_config=w_cfg, step="prepare"),
              filter_fn=lambda m, fqn: type(m) is nn.Linear and keep(fqn))
    if embeddings:
        e_cfg = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
        quantize_(model, QATConfig(weight_config=e_cfg, step="prepare"),
                  filter_fn=lambda m, fqn: type(m) is nn.Embedding and keep(fqn))
    return model


@torch.no_grad()
def round_to_int8_rows(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 rounding on the grid onnxruntime uses (scale = max|row| / 127,
    values in [-127, 127]). torchao's fake-quant grid during training differs from it by a
    fraction of a step at most; baking on this grid makes the int8 export reproduce the weights
    exactly (tests/test_bert_compress.py checks it)."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
    return (w / scale).round().clamp(-127, 127) * scale


@torch.no_grad()
def convert_qat(model: nn.Module, bake: bool = True) -> nn.Module:
    """Back to plain modules; with ``bake`` the weights are replaced by their int8-rounded
    values (``round_to_int8_rows``), so what was trained is what the int8 export computes."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    FQL, FQE = _fq_classes()
    if bake:
        for m in model.modules():
            if isinstance(m, (FQL, FQE)) and getattr(m, "weight_fake_quantizer", None) is not None:
                m.weight.copy_(round_to_int8_rows(m.weight))
    quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, (FQL, FQE)))
    return model


class QATPlugin(Plugin):
    name: ClassVar[str] = "qat"
    description: ClassVar[str] = "int8 quantization-aware training (torchao: per-channel weights, per-token activations)"
    Config: ClassVar[type] = QatConfig

    def transform(self, model: nn.Module) -> nn.Module:
        return prepare_qat(model, self.config.activations, self.config.embeddings, tuple(self.config.skip))

    def finalize(self, model: nn.Module) -> nn.Module:
        return convert_qat(model, bake=True)
