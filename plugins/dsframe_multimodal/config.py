"""Options of the multimodal model, its first-party encoders and the ``av_digits`` data. No torch
here: a wrong option is reported at once, and an encoder's modality is read from its ``Config``
(``modality`` class attribute) when its package registers that in ``dsframe.configs.encoders``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from dsframe import registry
from dsframe.checks import integers_at_least, unit_fractions
from dsframe.config.structured import to_dataclass
from dsframe.errors import ConfigError
from dsframe_multimodal import sources

FUSIONS = ("sigmoid_gate", "concat", "mean", "softmax_gate", "gmu")
MODALITIES = ("text", "image", "audio")  # what av_digits provides
SPLITS = ("train", "val", "test")
ENCODER_CONTRACT = ("modality", "inputs", "Config", "build", "arch", "from_arch")
AUDIO_SOURCES = ("mfcc", "waveform", "both")


# -- encoders ----------------------------------------------------------------------------------
@dataclass
class BertEncoderConfig:
    modality: ClassVar[str] = "text"  # what the encoder encodes (read without importing it)
    description: ClassVar[str] = "text: BERT-family encoder (default: packaged MiniLM-L6, optionally frozen)"
    kind: str = "bert"
    name_or_path: str = "minilm"  # the packaged all-MiniLM-L6-v2, a local folder, or a HF id
    pretrained: bool = True       # false: the same architecture with random weights (tests, debug)
    freeze: bool = False          # keep the BERT weights fixed (and in eval mode); the projection trains
    # overrides of the transformers config, e.g. {num_hidden_layers: 2, hidden_size: 64} for a tiny one
    hf_config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ResNetConfig:
    modality: ClassVar[str] = "image"  # what the encoder encodes (read without importing it)
    description: ClassVar[str] = "image: a small ResNet (GroupNorm) whose last feature map cells are the tokens"
    kind: str = "resnet"
    in_channels: int = 1
    channels: int = 32            # width of the first stage; doubles at each later stage
    blocks: List[int] = field(default_factory=lambda: [1, 1, 1])  # residual blocks per stage
    groups: int = 8               # GroupNorm groups

    def __post_init__(self):
        integers_at_least(self, "model.encoders.image", ("in_channels", "channels"))
        if not self.blocks or any(b < 1 for b in self.blocks):
            raise ConfigError("model.encoders.image.blocks", self.blocks, "a non-empty list of integers >= 1")
        if self.channels % self.groups:
            raise ConfigError("model.encoders.image.groups", self.groups,
                              f"a divisor of model.encoders.image.channels ({self.channels})")


@dataclass
class MFCCEncoderConfig:
    modality: ClassVar[str] = "audio"  # what the encoder encodes (read without importing it)
    description: ClassVar[str] = "audio: MFCC frames -> strided conv + transformer (frame mask)"
    kind: str = "mfcc"
    n_features: int = 13   # coefficients per frame
    layers: int = 2        # transformer layers over the (2x subsampled) frames
    heads: int = 4
    dropout: float = 0.1
    max_frames: int = 512  # after subsampling

    def __post_init__(self):
        integers_at_least(self, "model.encoders.audio", ("n_features", "layers", "heads", "max_frames"))
        unit_fractions(self, "model.encoders.audio", ("dropout",))


@dataclass
class Wav2VecConfig:
    modality: ClassVar[str] = "audio"  # what the encoder encodes (read without importing it)
    description: ClassVar[str] = "audio: raw 16 kHz waveform -> wav2vec2-style conv feature encoder + transformer"
    kind: str = "wav2vec"
    channels: int = 64
    # wav2vec 2.0's feature encoder: 7 convolutions, 320x downsampling (20 ms frames at 16 kHz)
    kernels: List[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    strides: List[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    pos_kernel: int = 16   # convolutional relative position embedding (wav2vec 2.0 uses 128)
    pos_groups: int = 4
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1

    def __post_init__(self):
        if len(self.kernels) != len(self.strides) or not self.kernels:
            raise ConfigError("model.encoders.audio.strides", self.strides,
                              f"a list as long as model.encoders.audio.kernels ({len(self.kernels)})")
        integers_at_least(self, "model.encoders.audio", ("channels", "pos_kernel", "pos_groups", "layers", "heads"))
        unit_fractions(self, "model.encoders.audio", ("dropout",))


def encoder_modality(kind: str) -> str:
    """The modality encoder ``kind`` encodes: from its registered Config when it says, else from the
    encoder class (which imports it)."""
    schema = registry.encoders.config_class(kind)
    return getattr(schema, "modality", None) or getattr(registry.encoders.get(kind), "modality", "")


def encoders_by_modality() -> dict[str, list[str]]:
    """modality -> the installed encoders for it (an encoder that fails to import is left out)."""
    out: dict[str, list[str]] = {}
    for kind in registry.encoders.installed():
        try:
            out.setdefault(encoder_modality(kind), []).append(kind)
        except ConfigError:
            continue
    return out


def check_encoder_kind(modality: str, kind: Any, by_modality: Optional[dict] = None) -> None:
    """``kind`` is an installed encoder of ``modality`` (``by_modality``: encoders_by_modality(),
    when the caller has it already)."""
    key = f"model.encoders.{modality}.kind"
    fits = (encoders_by_modality() if by_modality is None else by_modality).get(modality, [])
    if kind is None:
        raise ConfigError(key, None, f"an encoder for '{modality}': {', '.join(fits)}")
    registry.encoders.require(kind, key)
    if kind not in fits:
        raise ConfigError(key, kind, f"an encoder for '{modality}': {', '.join(fits) or '(none installed)'} "
                          f"('{kind}' encodes '{encoder_modality(kind) or '?'}')")


def encoder_config(modality: str, node: Any, by_modality: Optional[dict] = None) -> Any:
    """``model.encoders.<modality>`` checked against its encoder's Config."""
    node = dict(node or {})
    key, kind = f"model.encoders.{modality}.kind", node.get("kind")
    check_encoder_kind(modality, kind, by_modality)
    if not registry.encoders.has_registered_config(kind):  # the class is imported anyway: check it now
        check_encoder_contract(registry.encoders.get(kind, key), kind, key)
    return to_dataclass(registry.encoders.config_class(kind, key), node, f"model.encoders.{modality}")


def check_encoder_contract(cls: type, kind: str, key: str) -> None:
    lacks = [a for a in ENCODER_CONTRACT if not hasattr(cls, a)]
    if lacks:
        raise ConfigError(key, kind, f"an encoder class with {', '.join(ENCODER_CONTRACT)} "
                          f"({cls.__module__}.{cls.__qualname__} lacks {', '.join(lacks)}; see docs/multimodal.md)")


# -- model -------------------------------------------------------------------------------------
def _default_encoders() -> Dict[str, Any]:
    return {"text": {"kind": "bert"}, "image": {"kind": "resnet"}, "audio": {"kind": "mfcc"}}


@dataclass
class MultimodalConfig:
    description: ClassVar[str] = ("multimodal sandwich: per-modality encoders, cross-modal attention, "
                                  "sigmoid gate (or concat/mean/softmax/GMU), MLP decoder; missing modalities")
    kind: str = "multimodal"
    modalities: List[str] = field(default_factory=lambda: ["text", "image", "audio"])
    # modality -> its encoder's options; ``kind`` names an encoder of the dsframe.encoders group.
    # Entries of modalities not listed in ``modalities`` are ignored (unimodal baselines).
    encoders: Dict[str, Any] = field(default_factory=_default_encoders)
    width: int = 128               # d: the shared token width
    cross_attention: bool = True   # off: encoders' tokens go straight to pooling
    cross_layers: int = 1          # cross-modal attention blocks
    heads: int = 4                 # cross-attention heads
    fusion: str = "sigmoid_gate"   # sigmoid_gate | concat | mean | softmax_gate | gmu (2 modalities)
    hidden: int = 128              # decoder MLP width
    dropout: float = 0.1
    modality_dropout: float = 0.0  # training: chance to hide each present modality of a sample
    num_labels: int = 10

    def __post_init__(self):
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError("model.modalities", self.modalities, "a non-empty list without repeats")
        by_modality = encoders_by_modality()
        known = set(by_modality)
        for m in self.modalities:
            if m not in known:
                raise ConfigError("model.modalities", m, f"one of {', '.join(sorted(known)) or '(none)'} "
                                  "(the modalities of the installed dsframe.encoders)")
            self.encoders[m] = dataclasses.asdict(encoder_config(m, self.encoders.get(m), by_modality))
        for m in self.encoders:
            if m not in known:  # a typo here would otherwise be silently unused
                raise ConfigError(f"model.encoders.{m}", self.encoders[m],
                                  f"an entry for a modality: {', '.join(sorted(known))}")
        integers_at_least(self, "model", ("width", "heads", "cross_layers", "hidden"))
        integers_at_least(self, "model", ("num_labels",), 2)
        if self.width % self.heads:
            raise ConfigError("model.heads", self.heads, f"a divisor of model.width ({self.width})")
        if self.fusion not in FUSIONS:
            raise ConfigError("model.fusion", self.fusion, f"one of {', '.join(FUSIONS)}")
        if self.fusion == "gmu" and len(self.modalities) != 2:
            raise ConfigError("model.fusion", "gmu", f"a fusion for {len(self.modalities)} modalities: the GMU "
                              f"fuses exactly 2 (model.modalities={list(self.modalities)})")
        unit_fractions(self, "model", ("dropout", "modality_dropout"))


# -- data ---------------------------------------------------------------------------------------
@dataclass
class AVDigitsConfig:
    description: ClassVar[str] = ("audio-visual-text digits (AV-MNIST protocol): PCA-reduced MNIST, noisy FSDD MFCC "
                                  "or espeak-ng waveforms, noisy number words; fetched/generated once, offline")
    kind: str = "av_digits"
    modalities: List[str] = field(default_factory=lambda: list(MODALITIES))
    audio_source: str = "mfcc"  # mfcc: FSDD recordings | waveform: espeak-ng clips | both
    tokenizer: str = "minilm"
    max_length: int = 16
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0  # splits, pairing and noise; fixed: the test split never changes with the run seed
    max_train_samples: Optional[int] = None  # debug presets train on a subset; val/test stay whole
    # noise (defaults chosen on the validation split, see dsframe_multimodal.calibrate)
    image_energy_removed: float = 0.8
    image_noise: float = 0.0
    audio_noise: float = 2.5
    text_noise: float = 0.6
    text_languages: List[str] = field(default_factory=lambda: list(sources.WORDS))
    waveform_snr_db: float = 0.0
    waveform_seconds: float = 1.0
    voices: List[str] = field(default_factory=lambda: ["en-us", "en-gb", "en-gb-scotland", "en-029",
                                                       "en-us+f2", "en-gb+f4", "en-us+m3", "en-gb-x-rp+croak"])
    speeds: List[int] = field(default_factory=lambda: [130, 165, 200])
    pitches: List[int] = field(default_factory=lambda: [30, 50, 70])
    # presence simulation: {split: {modality: probability that a sample lacks it}}
    missing: Dict[str, Dict[str, float]] = field(default_factory=dict)
    keep_one_present: bool = True  # a sample never loses every modality

    def __post_init__(self):
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError("data.modalities", self.modalities, f"a non-empty list of distinct names from {list(MODALITIES)}")
        for m in self.modalities:
            if m not in MODALITIES:
                raise ConfigError("data.modalities", m, f"one of {', '.join(MODALITIES)}")
        if self.audio_source not in AUDIO_SOURCES:
            raise ConfigError("data.audio_source", self.audio_source, " | ".join(AUDIO_SOURCES))
        integers_at_least(self, "data", ("batch_size", "eval_batch_size", "max_length"))
        integers_at_least(self, "data", ("num_workers",), 0)
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, key) < 0.5:
                raise ConfigError(f"data.{key}", getattr(self, key), "a float in (0, 0.5)")
        if self.max_train_samples is not None and self.max_train_samples < 10:
            raise ConfigError("data.max_train_samples", self.max_train_samples, "null or an integer >= 10")
        if not 0.0 <= self.image_energy_removed < 1.0:
            raise ConfigError("data.image_energy_removed", self.image_energy_removed, "a fraction in [0, 1)")
        for key in ("image_noise", "audio_noise"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}", getattr(self, key), "a standard deviation >= 0")
        if not 0.0 <= self.text_noise <= 1.0:
            raise ConfigError("data.text_noise", self.text_noise, "a probability in [0, 1]")
        for lang in self.text_languages or [None]:
            if lang not in sources.WORDS:
                raise ConfigError("data.text_languages", lang, f"a non-empty list from {', '.join(sources.WORDS)}")
        if not 0.1 <= self.waveform_seconds <= 5.0:
            raise ConfigError("data.waveform_seconds", self.waveform_seconds, "seconds in [0.1, 5]")
        if len(self.voices) * len(self.speeds) * len(self.pitches) < 4:
            raise ConfigError("data.voices", self.voices, "voices x speeds x pitches giving at least 4 clips per "
                              "digit, so that train, val and test each get one")
        for split, probs in self.missing.items():
            if split not in SPLITS:
                raise ConfigError("data.missing", split, f"a split: {', '.join(SPLITS)}")
            for m, p in (probs or {}).items():
                if m not in self.modalities:
                    raise ConfigError(f"data.missing.{split}", m, f"a provided modality: {', '.join(self.modalities)}")
                if not 0.0 <= float(p) <= 1.0:
                    raise ConfigError(f"data.missing.{split}.{m}", p, "a probability in [0, 1]")

    @property
    def waveforms(self) -> bool:
        return "audio" in self.modalities and self.audio_source in ("waveform", "both")

    @property
    def mfcc(self) -> bool:
        return "audio" in self.modalities and self.audio_source in ("mfcc", "both")
