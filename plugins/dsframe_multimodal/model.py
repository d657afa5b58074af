"""MultimodalClassifier: the article's "sandwich" — modality encoders, cross-modal attention,
a fusion gate, a task decoder — registered as model kind ``multimodal``.

    tokens_m, mask_m = encoder_m(batch)                   per modality, width d   (encode)
    tokens_m = CrossModalAttention(tokens, masks, present)                        (fuse)
    h_m = masked mean of tokens_m;  h = fusion(h, present)  (sigmoid gate: Σ α_m·h_m)
    logits = classifier(MLP(h))                                                   (decode)

``present_<m>`` ([B] bool) in the batch says which samples have modality m (missing key: all
do). Training may also hide modalities at random (``modality_dropout``), never all of a
sample's. ``last_gate`` [B, M] holds the last forward's per-modality fusion weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from dsframe import registry
from dsframe.config.structured import to_dataclass
from dsframe.errors import ConfigError, DsframeError
from dsframe_multimodal.config import MultimodalConfig, check_encoder_contract, check_encoder_kind, encoder_config
from dsframe_multimodal.fusion import CrossModalAttention, build_fusion, masked_mean


def encoder_class(modality: str, kind: Any) -> type:
    """The encoder class for ``model.encoders.<modality>`` (its Config was checked with the config),
    checked against the encoder contract."""
    key = f"model.encoders.{modality}.kind"
    check_encoder_kind(modality, kind)
    cls = registry.encoders.get(kind, key=key)
    check_encoder_contract(cls, kind, key)
    return cls


class MultimodalClassifier(nn.Module):
    """Modality encoders + cross-modal attention + a presence-aware fusion gate + an MLP decoder."""

    kind: ClassVar[str] = "multimodal"
    description: ClassVar[str] = MultimodalConfig.description
    Config: ClassVar[type] = MultimodalConfig

    def __init__(self, config: MultimodalConfig, encoders: dict[str, nn.Module]):
        super().__init__()
        self.config = config
        self.modalities = list(config.modalities)
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        d = config.width
        self.cross = (CrossModalAttention(self.modalities, d, config.heads, config.dropout, config.cross_layers)
                      if config.cross_attention and len(self.modalities) > 1 else None)
        self.fusion = build_fusion(config.fusion, len(self.modalities), d)
        self.head = nn.Sequential(nn.LayerNorm(self.fusion.out_width), nn.Linear(self.fusion.out_width, config.hidden),
                                  nn.GELU(), nn.Dropout(config.dropout))
        self.classifier = nn.Linear(config.hidden, config.num_labels)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, config: MultimodalConfig) -> "MultimodalClassifier":
        encoders = {m: encoder_class(m, config.encoders[m]["kind"]).build(encoder_config(m, config.encoders[m]),
                                                                          config.width)
                    for m in config.modalities}
        return cls(config, encoders)

    def arch(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "num_labels": self.config.num_labels,
                "encoders": {m: {"kind": self.config.encoders[m]["kind"], **enc.arch()}
                             for m, enc in self.encoders.items()}}

    @classmethod
    def from_arch(cls, arch: dict) -> "MultimodalClassifier":
        config = to_dataclass(MultimodalConfig, arch["config"], "model")
        encoders = {m: encoder_class(m, a["kind"]).from_arch(a, config.width) for m, a in arch["encoders"].items()}
        return cls(config, encoders)

    @property
    def last_gate(self) -> torch.Tensor | None:
        """[B, M] weight of each modality (order: ``modalities``) in the last fused vector; 0 = absent."""
        return self.fusion.last_gate

    # -- forward ------------------------------------------------------------------------
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        tokens, masks, present = self.encode(inputs)
        return self.decode(self.fuse(tokens, masks, present))

    def encode(self, inputs: dict) -> tuple[dict, dict, torch.Tensor]:
        """Run every encoder; returns tokens and masks per modality and presence [B, M]."""
        size = self._check_batch(inputs)
        tokens, masks, present = {}, {}, []
        for m, enc in self.encoders.items():
            args = {k: inputs[k] for k in (*enc.inputs, *getattr(enc, "optional_inputs", ())) if k in inputs}
            tokens[m], masks[m] = enc(**args)
            if tokens[m].ndim != 3 or tokens[m].shape[0] != size or tokens[m].shape[2] != self.config.width:
                raise DsframeError(f"encoder '{self.config.encoders[m]['kind']}' of modality {m} returned tokens of "
                                   f"shape {list(tokens[m].shape)}; expected [{size}, N, {self.config.width}] "
                                   "(model.width)")
            masks[m] = masks[m].bool()
            flag = inputs.get(f"present_{m}")
            present.append(torch.ones(size, dtype=torch.bool, device=tokens[m].device) if flag is None
                           else flag.to(tokens[m].device).bool().reshape(size))
        present = torch.stack(present, dim=1)
        if self.training and self.config.modality_dropout > 0:
            present = drop_modalities(present, self.config.modality_dropout)
        return tokens, masks, present

    def fuse(self, tokens: dict, masks: dict, present: torch.Tensor) -> torch.Tensor:
        """Cross-modal attention, pooling per modality, then the fusion gate: [B, fusion.out_width]."""
        if self.cross is not None:
            tokens = self.cross(tokens, masks, present)
        pooled = torch.stack([masked_mean(tokens[m], masks[m]) for m in self.modalities], dim=1)
        return self.fusion(pooled, present)

    def decode(self, fused: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(fused))

    def _check_batch(self, inputs: dict) -> int:
        """The batch size; one-line errors for missing keys and disagreeing batch sizes."""
        sizes: dict[str, int] = {}
        for m, enc in self.encoders.items():
            missing = [k for k in enc.inputs if k not in inputs]
            if missing:
                raise ConfigError("model.modalities", m, f"modalities the batch provides (it lacks "
                                  f"{', '.join(repr(k) for k in missing)} for '{m}'; batch keys: "
                                  f"{', '.join(sorted(inputs))})")
            for k in (*enc.inputs, *getattr(enc, "optional_inputs", ()), f"present_{m}"):
                value = inputs.get(k)
                if isinstance(value, torch.Tensor) and value.ndim:
                    sizes[f"{m}:{k}"] = int(value.shape[0])
        if len(set(sizes.values())) > 1:
            raise DsframeError("modalities disagree in batch size: "
                               + ", ".join(f"{k} has {v}" for k, v in sizes.items()))
        if not sizes:
            raise DsframeError("the batch holds no tensor for any modality of the model")
        return next(iter(sizes.values()))


def drop_modalities(present: torch.Tensor, p: float) -> torch.Tensor:
    """Hide each present modality with probability ``p``, never all of a sample's: where every
    present one was drawn, one of them (uniformly at random) is kept."""
    drop = (torch.rand(present.shape, device=present.device) < p) & present
    kept = present & ~drop
    lost_all = present.any(1) & ~kept.any(1)
    if bool(lost_all.any()):
        pick = (torch.rand(present.shape, device=present.device) * present).argmax(1)
        rescue = torch.zeros_like(present)
        rescue[torch.arange(present.shape[0], device=present.device), pick] = True
        kept = kept | (rescue & lost_all.unsqueeze(1))
    return kept


@torch.no_grad()
def fusion_latency(model: MultimodalClassifier, inputs: dict, reps: int = 50, block: int = 5,
                   threads: int | None = 1) -> dict[str, Any]:
    """Milliseconds of the model's parts on ``inputs`` (give one sample for batch-1 latency), eval
    mode, CPU: ``encoders`` (all encoders), ``fusion`` (cross-modal attention + pooling + gate: what
    fusing adds over the encoders), ``decoder`` (the MLP head) and ``forward`` (all of it).

    Each part is timed in rounds — one untimed call, then ``block`` timed back-to-back calls — and
    the parts take turns within each round, so a change of load on a shared machine hits them
    alike. Returns {part: {"median", "min", "max"}} over ``reps`` timed calls each, plus settings.
    """
    import statistics
    import time

    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    was_training, old_threads = model.training, torch.get_num_threads()
    model.eval()
    if threads:
        torch.set_num_threads(threads)
    try:
        tokens, masks, present = model.encode(inputs)
        fused = model.fuse(tokens, masks, present)
        parts = {"encoders": lambda: model.encode(inputs), "fusion": lambda: model.fuse(tokens, masks, present),
                 "decoder": lambda: model.decode(fused), "forward": lambda: model(**inputs)}
        times: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(max(1, -(-reps // block))):
            for name, fn in parts.items():
                fn()
                for _ in range(block):
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) * 1e3)
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    out: dict[str, Any] = {name: {"median": round(statistics.median(v), 4), "min": round(min(v), 4),
                                  "max": round(max(v), 4)} for name, v in times.items()}
    out.update(batch_size=int(present.shape[0]), reps=len(times["fusion"]), threads=torch.get_num_threads()
               if not threads else threads, modalities=list(model.modalities), fusion_kind=model.config.fusion,
               cross_attention=model.cross is not None)
    return out
