"""Modality encoders: one modality's batch tensors -> tokens [B, N, d] and a token mask [B, N].

An encoder is registered in the entry-point group ``dsframe.encoders`` (first-party ones too),
so a package adds a modality without touching dsframe::

    [project.entry-points."dsframe.encoders"]
    depth_cnn = "my_package:DepthEncoder"

The contract (see ``Encoder``): class attributes ``modality`` (the name it encodes, e.g.
``"image"``), ``inputs`` (the batch keys it reads, e.g. ``("image",)``) and ``Config`` (a
dataclass of its options); ``__init__(config, width)``; ``forward(**inputs) -> (tokens, mask)``
with tokens [B, N, width] and mask [B, N] bool (True = a real token). ``arch()``/``from_arch``
default to the config and only need overriding when the weights' shapes come from elsewhere
(the BERT encoder records its transformers config).

Encoders never mix samples (GroupNorm / LayerNorm, no BatchNorm): an absent sample's zeros
must not move a present sample's features through batch statistics.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from dsframe.config.structured import to_dataclass
from dsframe.errors import ConfigError, DsframeError
from dsframe_multimodal.config import BertEncoderConfig, MFCCEncoderConfig, ResNetConfig, Wav2VecConfig


class Encoder(nn.Module):
    """Base class of the first-party encoders (an outside encoder only needs the same contract)."""

    modality: ClassVar[str] = ""
    inputs: ClassVar[tuple[str, ...]] = ()
    optional_inputs: ClassVar[tuple[str, ...]] = ()  # read when the batch has them
    description: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any, width: int):
        super().__init__()
        self.config = config
        self.width = width

    @classmethod
    def build(cls, config: Any, width: int) -> "Encoder":
        """A new encoder for training (may load pretrained weights)."""
        return cls(config, width)

    def arch(self) -> dict:
        return {"config": dataclasses.asdict(self.config)}

    @classmethod
    def from_arch(cls, arch: dict, width: int) -> "Encoder":
        """An encoder of the recorded shapes, weights to be loaded (never downloads anything)."""
        return cls(to_dataclass(cls.Config, arch["config"], f"model.encoders.{cls.modality}"), width)

    def shape_error(self, key: str, tensor: torch.Tensor, expected: str) -> DsframeError:
        return DsframeError(f"{self.modality} input '{key}' has shape {list(tensor.shape)}: encoder "
                            f"{type(self).__name__} expects {expected}")


def _safe_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """A key mask whose rows each keep at least one key: attention over an all-masked row is NaN
    (absent samples have no real frames). The returned token mask stays the true one."""
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        mask = mask.clone()
        mask[empty, 0] = True
    return mask


def _transformer(width: int, heads: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    # nested tensors would drop padded positions and change output shapes between batches
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


# -- text ------------------------------------------------------------------------------------
class BertEncoder(Encoder):
    """Text: a BERT-family encoder (default the packaged MiniLM-L6); its token states projected to d."""

    modality = "text"
    inputs = ("input_ids",)
    optional_inputs = ("attention_mask", "token_type_ids")
    description: ClassVar[str] = BertEncoderConfig.description
    Config = BertEncoderConfig

    def __init__(self, config: BertEncoderConfig, width: int, bert: nn.Module | None = None):
        super().__init__(config, width)
        if bert is None:
            from transformers import BertModel

            bert = BertModel(_hf_config(config), add_pooling_layer=False)
        self.bert = bert
        self.proj = nn.Sequential(nn.Linear(bert.config.hidden_size, width), nn.LayerNorm(width))
        if config.freeze:
            self.bert.requires_grad_(False)

    @classmethod
    def build(cls, config: BertEncoderConfig, width: int) -> "BertEncoder":
        if not config.pretrained:
            return cls(config, width)
        from transformers import BertModel

        from dsframe.models import hub

        bert = hub.load_hf_model(BertModel, config.name_or_path, key="model.encoders.text.name_or_path",
                                 config=_hf_config(config), add_pooling_layer=False)
        return cls(config, width, bert)

    def arch(self) -> dict:
        return {"config": {**dataclasses.asdict(self.config), "pretrained": False},
                "hf_config": self.bert.config.to_dict()}

    @classmethod
    def from_arch(cls, arch: dict, width: int) -> "BertEncoder":
        from transformers import BertConfig, BertModel

        config = to_dataclass(BertEncoderConfig, arch["config"], "model.encoders.text")
        return cls(config, width, BertModel(BertConfig.from_dict(arch["hf_config"]), add_pooling_layer=False))

    def train(self, mode: bool = True) -> "BertEncoder":
        super().train(mode)
        if self.config.freeze:
            self.bert.eval()  # a frozen encoder has no dropout either
        return self

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if input_ids.ndim != 2:
            raise self.shape_error("input_ids", input_ids, "[B, T] token ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze):
            hidden = self.bert(input_ids=input_ids, attention_mask=_safe_key_mask(mask).long(),
                               token_type_ids=token_type_ids).last_hidden_state
        return self.proj(hidden), mask


def _hf_config(config: BertEncoderConfig):
    from dsframe.models import hub

    hf = hub.load_hf_config(config.name_or_path, key="model.encoders.text.name_or_path")
    for key, value in config.hf_config.items():
        if not hasattr(hf, key):
            raise ConfigError(f"model.encoders.text.hf_config.{key}", value, f"a field of {type(hf).__name__}")
        setattr(hf, key, value)
    if getattr(hf, "model_type", "bert") != "bert":
        raise ConfigError("model.encoders.text.name_or_path", config.name_or_path,
                          f"a BERT-family model; this one is '{hf.model_type}'")
    hf._attn_implementation = "sdpa"
    return hf


# -- image -----------------------------------------------------------------------------------
class _Block(nn.Module):
    """A basic ResNet block (two 3x3 convolutions and a skip connection)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(groups, cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class ResNetEncoder(Encoder):
    """Image: a small ResNet; each cell of the last feature map is a token (7x7 = 49 for 28x28)."""

    modality = "image"
    inputs = ("image",)
    description: ClassVar[str] = ResNetConfig.description
    Config = ResNetConfig

    def __init__(self, config: ResNetConfig, width: int):
        super().__init__(config, width)
        c = config.channels
        self.stem = nn.Sequential(nn.Conv2d(config.in_channels, c, 3, 1, 1, bias=False),
                                  nn.GroupNorm(config.groups, c), nn.ReLU(inplace=True))
        stages, cin = [], c
        for i, n in enumerate(config.blocks):
            cout = c * 2 ** i
            stages += [_Block(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1, config.groups)
                       for j in range(n)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Sequential(nn.Linear(cin, width), nn.LayerNorm(width))
        self.pos = nn.Parameter(torch.zeros(1, 256, width))  # up to 16x16 cells (64x64 inputs)

    def forward(self, image):
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise self.shape_error("image", image, f"[B, {self.config.in_channels}, H, W] "
                                   f"(model.encoders.image.in_channels={self.config.in_channels})")
        feats = self.stages(self.stem(image))
        tokens = self.proj(feats.flatten(2).transpose(1, 2))
        if tokens.shape[1] > self.pos.shape[1]:
            raise self.shape_error("image", image, f"at most {self.pos.shape[1]} feature cells (images up "
                                   "to 64x64 with 3 stages)")
        tokens = tokens + self.pos[:, :tokens.shape[1]]
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


# -- audio: MFCC frames ----------------------------------------------------------------------
class MFCCEncoder(Encoder):
    """Audio: a strided 1-D convolution over MFCC frames, then a transformer with a frame mask."""

    modality = "audio"
    inputs = ("audio",)
    optional_inputs = ("audio_mask",)
    description: ClassVar[str] = MFCCEncoderConfig.description
    Config = MFCCEncoderConfig

    def __init__(self, config: MFCCEncoderConfig, width: int):
        super().__init__(config, width)
        self.norm_in = nn.LayerNorm(config.n_features)
        self.conv = nn.Sequential(nn.Conv1d(config.n_features, width, 3, 1, 1), nn.GELU(),
                                  nn.Conv1d(width, width, 3, 2, 1), nn.GELU())
        self.pos = nn.Parameter(torch.zeros(1, config.max_frames, width))
        self.encoder = _transformer(width, config.heads, config.layers, config.dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, audio, audio_mask=None):
        if audio.ndim != 3 or audio.shape[2] != self.config.n_features:
            raise self.shape_error("audio", audio, f"[B, frames, {self.config.n_features}] "
                                   f"(model.encoders.audio.n_features={self.config.n_features})")
        if audio_mask is None:
            audio_mask = torch.ones(audio.shape[:2], dtype=torch.bool, device=audio.device)
        elif audio_mask.shape != audio.shape[:2]:
            raise self.shape_error("audio_mask", audio_mask, f"[B, frames] = {list(audio.shape[:2])}")
        x = self.norm_in(audio) * audio_mask.unsqueeze(-1)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        mask = audio_mask.bool()[:, ::2][:, :x.shape[1]]  # frame t of the output starts at input 2t
        if x.shape[1] > self.pos.shape[1]:
            raise self.shape_error("audio", audio, f"at most {2 * self.pos.shape[1]} frames "
                                   "(model.encoders.audio.max_frames after 2x subsampling)")
        x = self.encoder(x + self.pos[:, :x.shape[1]], src_key_padding_mask=~_safe_key_mask(mask))
        return self.norm(x), mask


# -- audio: raw waveform (wav2vec2-style) ----------------------------------------------------
class Wav2VecEncoder(Encoder):
    """Audio: wav2vec 2.0's convolutional feature encoder + conv position embedding + transformer."""

    modality = "audio"
    inputs = ("waveform",)
    optional_inputs = ("waveform_mask",)
    description: ClassVar[str] = Wav2VecConfig.description
    Config = Wav2VecConfig

    def __init__(self, config: Wav2VecConfig, width: int):
        super().__init__(config, width)
        c, convs, cin = config.channels, [], 1
        for i, (k, s) in enumerate(zip(config.kernels, config.strides)):
            # as in wav2vec 2.0 (base): GroupNorm with one group per channel on the first layer only
            norm = nn.GroupNorm(c, c) if i == 0 else nn.Identity()
            convs += [nn.Conv1d(cin, c, k, s, bias=False), norm, nn.GELU()]
            cin = c
        self.features = nn.Sequential(*convs)
        self.proj = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, width))
        if width % config.pos_groups:
            raise ConfigError("model.encoders.audio.pos_groups", config.pos_groups,
                              f"a divisor of model.width ({width})")
        self.pos_conv = nn.Conv1d(width, width, config.pos_kernel, padding=config.pos_kernel // 2,
                                  groups=config.pos_groups)
        self.encoder = _transformer(width, config.heads, config.layers, config.dropout)
        self.norm = nn.LayerNorm(width)

    def frames(self, samples: torch.Tensor) -> torch.Tensor:
        """Number of output frames for ``samples`` valid input samples (the conv length formula)."""
        n = samples
        for k, s in zip(self.config.kernels, self.config.strides):
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n.clamp(min=0)

    def forward(self, waveform, waveform_mask=None):
        if waveform.ndim != 2:
            raise self.shape_error("waveform", waveform, "[B, samples] (mono 16 kHz)")
        if int(self.frames(torch.tensor(waveform.shape[1]))) < 1:
            raise self.shape_error("waveform", waveform, f"at least {self._min_samples()} samples")
        if waveform_mask is None:
            waveform_mask = torch.ones_like(waveform, dtype=torch.bool)
        elif waveform_mask.shape != waveform.shape:
            raise self.shape_error("waveform_mask", waveform_mask, f"the waveform's shape {list(waveform.shape)}")
        x = self.features((waveform * waveform_mask).unsqueeze(1)).transpose(1, 2)
        lengths = self.frames(waveform_mask.sum(1))
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        x = self.proj(x)
        pos = self.pos_conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)
        x = self.encoder(x + nn.functional.gelu(pos), src_key_padding_mask=~_safe_key_mask(mask))
        return self.norm(x), mask

    def _min_samples(self) -> int:
        n = 1
        for k, s in reversed(list(zip(self.config.kernels, self.config.strides))):
            n = (n - 1) * s + k
        return n
