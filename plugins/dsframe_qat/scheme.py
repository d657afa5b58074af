"""The int8 weight grid that QAT trains onto and the export writes, chosen from the machine.

onnxruntime's dynamic int8 multiplies uint8 activations by int8 weights (u8s8). Without a
VNNI/AMX dot-product instruction, x86 kernels use ``vpmaddubsw``, which adds two u8·s8
products into a *saturating* int16: 255·127 + 255·127 = 64,770 does not fit, and logits go
wrong (on an AVX2-only EPYC a tiny BERT's int8 logits were off by 12.4 on a scale of 38).
With 7-bit weights (onnxruntime's ``reduce_range=True``: values in [-64, 64]) a pair sums to
at most 255·128 = 32,640 < 32,767: exact on every CPU, at the price of half the weight
resolution. VNNI (``vpdpbusd``), AMX and ARM's dot products accumulate in int32 and never
saturate, so ``w8`` is right there.

    w8  per-channel symmetric int8 weights, q ∈ [-127, 127], scale = max|row| / 127
    w7  the same with q ∈ [-64, 64], scale = max|row| / 64 (onnxruntime reduce_range)

Both grids are computed the way onnxruntime's quantizer computes them (scale in float64 from
``2·max|row| / (qmax - qmin)``, cast to float32; round half to even), so a weight baked by
``fake_quantize_rows`` is stored exactly by ``quantize_dynamic``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from dsframe_qat.config import SCHEME_CHOICES

__all__ = ["SCHEMES", "CHOICES", "Int8Scheme", "saturates", "choose_scheme", "resolve_scheme",
           "fake_quantize_rows", "warn_if_saturates"]


@dataclass(frozen=True)
class Int8Scheme:
    name: str
    qmax: int            # weights lie in [-qmax, qmax]
    reduce_range: bool   # what onnxruntime's quantize_dynamic is told
    description: str


SCHEMES = {
    "w8": Int8Scheme("w8", 127, False, "8-bit weights [-127, 127]; needs VNNI/AMX on x86 (u8s8 saturates without)"),
    "w7": Int8Scheme("w7", 64, True, "7-bit weights [-64, 64] (reduce_range); exact on every CPU"),
}
CHOICES = SCHEME_CHOICES

# instructions whose u8·s8 dot products accumulate in int32 (no int16 saturation)
NON_SATURATING = ("avx512_vnni", "avx_vnni", "amx_int8")
_X86_MARKERS = ("sse2", "avx", "avx2")


def _flags(flags) -> frozenset[str]:
    if flags is None:
        from dsframe.machine import cpu_flags

        flags = cpu_flags()
    return frozenset(flags)


def saturates(flags=None) -> bool:
    """Whether onnxruntime's u8s8 int8 kernels can saturate on a CPU with these flags (default:
    this machine's): x86 without VNNI/AMX. ARM and unknown non-x86 CPUs do not."""
    import platform

    flags = _flags(flags)
    x86 = any(f in flags for f in _X86_MARKERS) or (
        not flags and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"))
    return x86 and not any(f in flags for f in NON_SATURATING)


def choose_scheme(flags=None) -> str:
    """``w7`` where u8s8 would saturate, else ``w8`` (twice the weight resolution)."""
    return "w7" if saturates(flags) else "w8"


def resolve_scheme(name: str, flags=None) -> Int8Scheme:
    """``auto`` → this machine's scheme; a scheme's name → that scheme."""
    if name == "auto":
        name = choose_scheme(flags)
    return SCHEMES[name]


@torch.no_grad()
def row_scales(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """onnxruntime's per-channel symmetric scale of each row: float32(2·max|row| / (2·qmax)) in
    float64 arithmetic, 1.0 for an all-zero row."""
    absmax = w.detach().abs().amax(dim=1, keepdim=True).float()
    scale = ((2.0 * absmax).double() / (2 * qmax)).float()
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def fake_quantize_rows(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """``w`` rounded onto the per-row grid (straight-through gradient: d out / d w = 1)."""
    scale = row_scales(w, qmax)
    q = torch.clamp(torch.round(w.detach().float() / scale), -qmax, qmax) * scale
    return w + (q.to(w.dtype) - w).detach()


class RowGridFakeQuantizer(torch.nn.Module):
    """Drop-in for torchao's weight fake quantizer on the export's exact grid. Keeps the replaced
    quantizer's ``config`` (torchao's convert step reads it) and ``enabled`` switch."""

    def __init__(self, qmax: int, config=None):
        super().__init__()
        self.qmax = qmax
        self.config = config
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_rows(w, self.qmax) if self.enabled else w

    def extra_repr(self) -> str:
        return f"qmax={self.qmax}"


_warned: set[str] = set()


def warn_if_saturates(scheme: str | None, what: str, flags=None) -> bool:
    """One warning per process and scheme when an int8 model built for ``scheme`` would saturate
    on this CPU; returns whether it would."""
    if scheme != "w8" or not saturates(flags):
        return False
    if scheme not in _warned:
        _warned.add(scheme)
        warnings.warn(f"{what} has 8-bit weights (int8 scheme w8, built for a CPU with VNNI/AMX); this CPU has "
                      f"no {'/'.join(NON_SATURATING)}, so onnxruntime's u8s8 kernels saturate and its outputs "
                      "can be wrong: export it again with scheme w7 (or auto) on this machine",
                      RuntimeWarning, stacklevel=3)
    return True
