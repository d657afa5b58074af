"""Options of the ``qat`` plugin. No torch here: a wrong option is reported at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List

from dsframe.errors import ConfigError

SCHEME_CHOICES = ("auto", "w8", "w7")  # dsframe_qat.scheme.SCHEMES holds what w8 / w7 are
ACTIVATIONS = ("per_token", "per_tensor", "none")


@dataclass
class QatConfig:
    description: ClassVar[str] = "int8 quantization-aware training (torchao: per-channel weights, per-token activations)"
    bits: int = 8                   # only 8 is supported (int8 kernels downstream)
    activations: str = "per_token"  # per_token | per_tensor | none
    embeddings: bool = True         # fake-quantize embedding tables (int8 per row)
    skip: List[str] = field(default_factory=list)  # module-name prefixes left unquantized
    scheme: str = "auto"            # weight grid: auto (w7 on x86 without VNNI/AMX, else w8) | w8 | w7

    def __post_init__(self):
        if self.bits != 8:
            raise ConfigError("plugins.qat.bits", self.bits, "8 (int8 is what the CPU kernels run)")
        if self.activations not in ACTIVATIONS:
            raise ConfigError("plugins.qat.activations", self.activations, "one of per_token, per_tensor, none")
        if self.scheme not in SCHEME_CHOICES:
            raise ConfigError("plugins.qat.scheme", self.scheme, " | ".join(SCHEME_CHOICES))
        self.skip = list(self.skip)
