"""qat: 8-bit quantization-aware training with torchao (prepare -> train -> convert).

``transform`` swaps every ``nn.Linear`` for torchao's ``FakeQuantizedLinear``
(int8 activations per token, dynamic) whose weight fake quantizer is the export's exact
per-channel grid (``dsframe_qat.scheme``: ``w8`` = [-127, 127], or ``w7`` = [-64, 64] where
onnxruntime's u8s8 kernels would saturate; ``scheme: auto`` picks from the CPU flags) and,
with ``embeddings: true``, every ``nn.Embedding`` for a fake-quantized one (int8 per row).
``finalize`` bakes the fake-quantized weights into the fp32 tensors (they then lie exactly
on the grid), converts back to plain ``nn.Linear`` / ``nn.Embedding`` (an ordinary dsframe
model file) and writes ``qat.json`` (the scheme, the machine) into the stage directory, which
the export stage follows. The real int8 model is made from it by the ``export`` stage or by
``dsframe_compress.int8.torch_dynamic_int8``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from dsframe.errors import DsframeError
from dsframe.plugin import Plugin
from dsframe_qat.config import QatConfig
from dsframe_qat.scheme import SCHEMES, RowGridFakeQuantizer, fake_quantize_rows, resolve_scheme

__all__ = ["QATPlugin", "QatConfig", "prepare_qat", "convert_qat"]


def _fq_classes():
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear
    return FakeQuantizedLinear, FakeQuantizedEmbedding


def prepare_qat(model: nn.Module, activations: str = "per_token", embeddings: bool = True,
                skip: tuple = (), scheme: str = "w8") -> nn.Module:
    """Fake-quantize ``model`` in place: Linear weights on ``scheme``'s grid (``auto``: this
    machine's), embedding rows on the int8 grid, activations per token (or per tensor)."""
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
    # torchao's symmetric int8 grid is [-128, 127] with scale max/127.5, not the export's: train
    # on exactly the grid the int8 model will hold. Embedding rows are looked up, not multiplied
    # (no saturation), so they keep 8 bits under every scheme.
    qmax = resolve_scheme(scheme).qmax
    for m in model.modules():
        if isinstance(m, (FQL, FQE)) and getattr(m, "weight_fake_quantizer", None) is not None:
            m.weight_fake_quantizer = RowGridFakeQuantizer(qmax if isinstance(m, FQL) else 127,
                                                           m.weight_fake_quantizer.config)
    return model


def model_scheme(model: nn.Module) -> str | None:
    """The scheme a fake-quantized model trains on (``w8``/``w7``), None if it is not one."""
    FQL, _ = _fq_classes()
    qmax = {getattr(m.weight_fake_quantizer, "qmax", None) for m in model.modules()
            if isinstance(m, FQL) and getattr(m, "weight_fake_quantizer", None) is not None}
    names = [s.name for s in SCHEMES.values() if s.qmax in qmax]
    return names[0] if len(names) == 1 else None


@torch.no_grad()
def convert_qat(model: nn.Module, bake: bool = True) -> nn.Module:
    """Back to plain modules; with ``bake`` the weights are replaced by their fake-quantized
    values (the grid trained on), so what was trained is what the int8 export stores."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    FQL, FQE = _fq_classes()
    if bake:
        for m in model.modules():
            fq = getattr(m, "weight_fake_quantizer", None) if isinstance(m, (FQL, FQE)) else None
            if fq is not None:
                m.weight.copy_(fake_quantize_rows(m.weight, getattr(fq, "qmax", 127)))
    quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, (FQL, FQE)))
    return model


class QATPlugin(Plugin):
    name: ClassVar[str] = "qat"
    description: ClassVar[str] = QatConfig.description
    Config: ClassVar[type] = QatConfig

    def transform(self, model: nn.Module) -> nn.Module:
        self.scheme = resolve_scheme(self.config.scheme)
        return prepare_qat(model, self.config.activations, self.config.embeddings, tuple(self.config.skip),
                           self.scheme.name)

    def finalize(self, model: nn.Module) -> nn.Module:
        model = convert_qat(model, bake=True)
        stage_dir = getattr(self.context, "stage_dir", None)
        if stage_dir is not None:  # the export stage builds the int8 model for the grid trained on
            from dsframe.io import write_json
            from dsframe.machine import machine_info

            s = getattr(self, "scheme", None) or resolve_scheme(self.config.scheme)
            write_json(stage_dir / "qat.json", {"scheme": s.name, "requested": self.config.scheme, "qmax": s.qmax,
                                                "reduce_range": s.reduce_range, "machine": machine_info()})
        return model
