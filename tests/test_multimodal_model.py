"""The multimodal model: gate numerics by hand, presence masks (an absent modality's tensors change
nothing), no NaN when a modality is absent from the whole batch or a sample has none, modality
dropout, every fusion kind, save/load, one-line errors, an outside encoder, stage-level model
overrides, a 2-rank ddp fit and fused-to-fused distillation (real Lightning fits)."""
from __future__ import annotations

import json
import math
import os
import textwrap
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dsframe import Plugin, registry
from dsframe.config import validate
from dsframe.config.structured import to_dataclass
from dsframe.errors import ConfigError, DsframeError
from dsframe.models.files import load_model, save_model
from dsframe.plugin import StageContext
from dsframe.runner import Runner
from dsframe_multimodal.fusion import (GMU, ConcatFusion, CrossModalAttention, MeanFusion, SigmoidGate, SoftmaxGate,
                                      masked_mean)
from dsframe_multimodal.model import MultimodalClassifier, MultimodalConfig, drop_modalities, fusion_latency

from tests.conftest import run_cli

TINY_TEXT = {"kind": "bert", "pretrained": False,
             "hf_config": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                           "intermediate_size": 64, "vocab_size": 1000}}
SMALL = {"width": 32, "heads": 2, "hidden": 32,
         "encoders": {"text": TINY_TEXT, "image": {"kind": "resnet", "channels": 8, "groups": 4, "blocks": [1, 1]},
                      "audio": {"kind": "mfcc", "layers": 1, "heads": 2}}}
MODALITIES = ("text", "image", "audio")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: with the CPU shared, two intra-op threads ran these forwards ~100x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def config(**overrides) -> MultimodalConfig:
    node = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(SMALL), OmegaConf.create(overrides)))
    return to_dataclass(MultimodalConfig, node, "model")


def model(seed: int = 0, **overrides) -> MultimodalClassifier:
    torch.manual_seed(seed)
    return MultimodalClassifier.build(config(**overrides))


def make_batch(b: int = 6, seed: int = 0, tokens: int = 7, frames: int = 20, samples: int = 4000) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, tokens, dtype=torch.long)
    mask[1, 4:] = 0  # a padded sentence
    audio_mask = torch.ones(b, frames, dtype=torch.bool)
    audio_mask[2, 12:] = False  # a shorter recording
    batch = {"labels": torch.randint(0, 10, (b,), generator=g),
             "input_ids": torch.randint(5, 1000, (b, tokens), generator=g), "attention_mask": mask,
             "image": torch.randn(b, 1, 28, 28, generator=g),
             "audio": torch.randn(b, frames, 13, generator=g), "audio_mask": audio_mask,
             "waveform": torch.randn(b, samples, generator=g),
             "waveform_mask": torch.ones(b, samples, dtype=torch.bool)}
    for m in MODALITIES:
        batch[f"present_{m}"] = torch.ones(b, dtype=torch.bool)
    return batch


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


# -- the gate and the other fusions, by hand --------------------------------------------------
def test_sigmoid_gate_is_the_articles_formula():
    """α_i = σ(W_g·[h_1, h_2] + b_g), h = Σ α_i·h_i, checked on numbers worked out by hand."""
    gate = SigmoidGate(2, 2)
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.weight[1, 0] = 1.0  # α_2 also looks at the first value of h_1
        gate.gate.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    h = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])  # h_1 = (1, 2), h_2 = (4, 0)
    fused = gate(h, torch.tensor([[True, True]]))
    a1, a2 = 0.5, 1 / (1 + math.exp(-(1.0 + math.log(3.0))))  # σ(0), σ(h_1[0] + ln 3)
    torch.testing.assert_close(gate.last_gate, torch.tensor([[a1, a2]]))
    torch.testing.assert_close(fused, torch.tensor([[a1 * 1 + a2 * 4, a1 * 2 + a2 * 0]]))


def test_sigmoid_gate_with_random_weights_and_an_absent_modality():
    torch.manual_seed(0)
    m, d = 3, 5
    gate = SigmoidGate(m, d)
    h = torch.randn(4, m, d)
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    fused = gate(h, present)
    W, b, ph = gate.gate.weight, gate.gate.bias, gate.placeholder.value
    for s in range(4):
        x = [h[s, i] if present[s, i] else ph[i] for i in range(m)]  # absent: the learned placeholder
        alpha = [float(torch.sigmoid(sum(W[i, j * d:(j + 1) * d] @ x[j] for j in range(m)) + b[i])) if present[s, i]
                 else 0.0 for i in range(m)]
        expected = sum(alpha[i] * h[s, i] for i in range(m))
        torch.testing.assert_close(gate.last_gate[s], torch.tensor(alpha))
        torch.testing.assert_close(fused[s], expected if torch.is_tensor(expected) else torch.zeros(d))


def test_other_fusions_by_hand():
    torch.manual_seed(0)
    h = torch.randn(3, 2, 4)
    present = torch.tensor([[1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    mean = MeanFusion(2, 4)
    torch.testing.assert_close(mean(h, present), torch.stack([h[0].mean(0), h[1, 1], torch.zeros(4)]))
    concat = ConcatFusion(2, 4)
    out = concat(h, present)
    torch.testing.assert_close(out[1], torch.cat([concat.placeholder.value[0], h[1, 1]]))
    soft = SoftmaxGate(2, 4)
    fused = soft(h, present)
    w = torch.softmax(soft.score(h[0].flatten()), -1)
    torch.testing.assert_close(fused[0], w[0] * h[0, 0] + w[1] * h[0, 1])
    torch.testing.assert_close(soft.last_gate[1:], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    gmu = GMU(2, 4)
    fused = gmu(h, present)
    z = torch.sigmoid(gmu.z(h[0].flatten()))
    h1, h2 = torch.tanh(gmu.hidden[0](h[0, 0])), torch.tanh(gmu.hidden[1](h[0, 1]))
    torch.testing.assert_close(fused[0], z * h1 + (1 - z) * h2)
    torch.testing.assert_close(fused[1], torch.tanh(gmu.hidden[1](h[1, 1])))  # only the present side
    torch.testing.assert_close(fused[2], torch.zeros(4))


def test_cross_attention_by_hand_attends_only_to_other_present_modalities():
    torch.manual_seed(0)
    d = 4
    cross = CrossModalAttention(["a", "b"], d, heads=1, dropout=0.0).eval()
    with torch.no_grad():
        cross.type_embedding.normal_()
    tokens = {"a": torch.randn(2, 2, d), "b": torch.randn(2, 3, d)}
    masks = {"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.tensor([[True, True, False]] * 2)}
    present = torch.tensor([[True, True], [True, False]])  # sample 1 lacks b
    out = cross(tokens, masks, present)
    blk = cross.blocks[0]

    def by_hand(s: int, m: str, i: int) -> torch.Tensor:
        x = {n: tokens[n][s] + cross.type_embedding[j] for j, n in enumerate(("a", "b"))}
        q, _, _ = blk.qkv(blk.norm(x[m][i])).split(d)
        other = "b" if m == "a" else "a"
        keys, values = [torch.zeros(d)], [torch.zeros(d)]  # the null key/value
        for t in range(tokens[other].shape[1]):
            if masks[other][s, t] and present[s, 0 if other == "a" else 1]:
                _, k, v = blk.qkv(blk.norm(x[other][t])).split(d)
                keys.append(k)
                values.append(v)
        w = torch.softmax(torch.stack([q @ k / math.sqrt(d) for k in keys]), 0)
        y = x[m][i] + blk.out(sum(wi * v for wi, v in zip(w, values)))
        return y + blk.ffn(y)

    for s, m, i in [(0, "a", 1), (0, "b", 2), (1, "a", 0), (1, "b", 1)]:
        torch.testing.assert_close(out[m][s, i], by_hand(s, m, i))
    # sample 1, modality a: b is absent, so a attends to the null key only: x + out bias
    x = tokens["a"][1, 0] + cross.type_embedding[0]
    y = x + blk.out.bias
    torch.testing.assert_close(out["a"][1, 0], y + blk.ffn(y))


def test_masked_mean_of_a_row_without_tokens_is_zero():
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = masked_mean(x, mask)
    torch.testing.assert_close(out[0], (x[0, 0] + x[0, 2]) / 2)
    assert torch.equal(out[1], torch.zeros(4))


# -- presence ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["sigmoid_gate", "softmax_gate", "concat", "mean"])
def test_an_absent_modality_changes_nothing(fusion):
    """Whatever an absent modality's tensors hold, every sample's logits and gate stay the same —
    also in training mode (no batch statistics mix samples; dropout off to compare)."""
    no_dropout = {"text": {"hf_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
                  "audio": {"dropout": 0.0}}
    net = model(fusion=fusion, dropout=0.0, encoders=no_dropout)
    batch = make_batch()
    batch["present_audio"][[0, 3]] = False
    batch["present_text"][[3, 4]] = False
    changed = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(7)
    for s in (0, 3):
        changed["audio"][s] = 100 * torch.randn(20, 13, generator=g)
        changed["audio_mask"][s, 5:] = False
    for s in (3, 4):
        changed["input_ids"][s] = torch.randint(5, 1000, (7,), generator=g)
    for mode in (False, True):
        net.train(mode)
        a = net(**inputs(batch))
        gate_a = net.last_gate.clone()
        b = net(**inputs(changed))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(gate_a, net.last_gate, rtol=0, atol=1e-6)
        assert (gate_a[[0, 3], 2] == 0).all() and (gate_a[[3, 4], 0] == 0).all()
    # and presence matters: the same batch with audio present gives other logits
    batch["present_audio"][:] = True
    assert not torch.allclose(net.eval()(**inputs(batch))[0], a[0])


def test_no_nan_when_a_modality_is_absent_for_the_whole_batch_or_a_sample_has_none():
    net = model(modality_dropout=0.3).train()
    batch = make_batch()
    batch["present_audio"][:] = False
    for m in MODALITIES:
        batch[f"present_{m}"][5] = False  # sample 5 has no modality at all
    batch["audio_mask"][:] = False  # and no real audio frame anywhere
    logits = net(**inputs(batch))
    loss = F.cross_entropy(logits, batch["labels"])
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["fusion.placeholder.value"][2].abs().sum() > 0  # the audio placeholder stood in
    assert (net.last_gate[:, 2] == 0).all() and (net.last_gate[5] == 0).all()
    # the documented answer for a sample without any modality: the decoder applied to h_fused = 0
    net.eval()
    torch.testing.assert_close(net(**inputs(batch))[5], net.decode(torch.zeros(1, 32))[0])


def test_batch_without_presence_flags_means_all_present():
    net = model().eval()
    batch = make_batch()
    flagged = net(**inputs(batch))
    unflagged = net(**{k: v for k, v in inputs(batch).items() if not k.startswith("present_")})
    torch.testing.assert_close(flagged, unflagged)


def test_modality_dropout_never_drops_all_of_a_samples_modalities():
    torch.manual_seed(0)
    present = torch.rand(4000, 3) < 0.7
    kept = drop_modalities(present, 0.9)
    assert not (kept & ~present).any()  # only hides, never invents
    assert (kept.any(1) == present.any(1)).all()  # a sample with any modality keeps at least one
    singles = present.sum(1) == 1
    assert torch.equal(kept[singles], present[singles])
    rate = 1 - kept[present.sum(1) == 3].float().mean()
    assert 0.5 < rate < 0.66  # 0.9 asked, capped by "keep one of three" at 2/3
    assert 0.25 < 1 - drop_modalities(present, 0.3)[present].float().mean() < 0.35
    net = model(modality_dropout=0.9).train()
    batch = make_batch(b=16)
    net(**inputs(batch))
    assert (net.last_gate > 0).any(1).all() and (net.last_gate == 0).any()
    net.eval()
    net(**inputs(batch))
    assert (net.last_gate > 0).all()  # no dropout at evaluation


# -- every fusion, every encoder --------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {"fusion": "sigmoid_gate"}, {"fusion": "concat"}, {"fusion": "mean"}, {"fusion": "softmax_gate"},
    {"fusion": "gmu", "modalities": ["image", "audio"]}, {"cross_attention": False},
    {"modalities": ["image"]}, {"encoders": {"audio": {"kind": "wav2vec", "channels": 16, "layers": 1, "heads": 2}}},
    {"encoders": {"text": {"freeze": True}}},
])
def test_each_configuration_trains_a_step(overrides):
    net = model(**overrides).train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    batch = make_batch()
    batch["present_image"][1] = False
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    loss = F.cross_entropy(net(**inputs(batch)), batch["labels"])
    loss.backward()
    opt.step()
    moved = [n for n, p in net.named_parameters() if not torch.equal(before[n], p)]
    assert torch.isfinite(loss) and moved
    assert net.last_gate.shape == (6, len(net.modalities))
    assert {n.split(".")[0] for n in moved} >= {"encoders", "fusion" if net.config.fusion != "mean" else "head",
                                               "classifier"}
    if overrides.get("encoders", {}).get("text", {}).get("freeze"):
        assert not any(n.startswith("encoders.text.bert.") for n in moved)
        assert any(n.startswith("encoders.text.proj.") for n in moved)


def test_wav2vec_frame_mask_follows_the_conv_lengths():
    net = model(encoders={"audio": {"kind": "wav2vec", "channels": 16, "layers": 1, "heads": 2}})
    enc = net.encoders["audio"]
    wav = torch.randn(2, 16000)
    mask = torch.ones(2, 16000, dtype=torch.bool)
    mask[1, 8000:] = False
    tokens, tmask = enc(wav, mask)
    assert tokens.shape == (2, 49, 32)  # wav2vec 2.0: one frame per 20 ms at 16 kHz
    assert tmask[0].sum() == 49 and tmask[1].sum() == 24  # 8000 samples: floor((8000-400)/320)+1


def test_save_and_load_round_trip(tmp_path):
    for overrides in ({}, {"encoders": {"audio": {"kind": "wav2vec", "channels": 16, "layers": 1, "heads": 2}},
                           "fusion": "concat"}):
        net = model(seed=3, **overrides).eval()
        path = save_model(net, tmp_path / "mm.pt", meta={"stage": "x"})
        back = load_model(path, expect_kind="multimodal").eval()
        batch = make_batch()
        batch["present_image"][0] = False
        assert torch.equal(net(**inputs(batch)), back(**inputs(batch)))
        assert back.config == net.config and back.arch() == net.arch()


# -- one-line errors --------------------------------------------------------------------------
def _one_line(exc: Exception) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("overrides,key,says", [
    ({"modalities": ["text", "smell"]}, "model.modalities", "one of audio, image, text"),
    ({"modalities": ["text", "text"]}, "model.modalities", "without repeats"),
    ({"fusion": "gmu"}, "model.fusion", "exactly 2"),
    ({"fusion": "max"}, "model.fusion", "one of sigmoid_gate"),
    ({"encoders": {"image": {"kind": "mfcc"}}}, "model.encoders.image.kind", "an encoder for 'image': resnet"),
    ({"encoders": {"image": {"kind": "vit"}}}, "model.encoders.image.kind", "one of"),
    ({"encoders": {"image": {"depth": 3}}}, "model.encoders.image.depth", "a key of"),
    ({"encoders": {"audoi": {"kind": "mfcc"}}}, "model.encoders.audoi", "an entry for a modality"),
    ({"heads": 5}, "model.heads", "a divisor of model.width"),
    ({"modalities": ["image", "depth"], "encoders": {"depth": {"kind": "no_config"}}}, "model.encoders.depth.kind",
     "lacks Config, build, arch, from_arch"),
    ({"modality_dropout": 1.0}, "model.modality_dropout", "[0, 1)"),
])
def test_bad_config_is_one_clear_line(overrides, key, says):
    if "depth" in overrides.get("modalities", ()):  # an outside encoder that misses most of the contract
        registry.encoders.register("no_config", type("NoConfig", (nn.Module,), {"modality": "depth", "inputs": ()}))
    try:
        with pytest.raises(ConfigError) as err:
            config(**overrides)
    finally:
        registry.encoders._extra.pop("no_config", None)
    assert err.value.key == key and says in _one_line(err.value)


def test_bad_batches_are_one_clear_line():
    net = model().eval()
    batch = inputs(make_batch())
    with pytest.raises(DsframeError, match="disagree in batch size") as err:
        net(**{**batch, "image": batch["image"][:4]})
    assert "image:image has 4" in _one_line(err.value)
    with pytest.raises(ConfigError, match="lacks 'image' for 'image'") as err:
        net(**{k: v for k, v in batch.items() if k != "image"})
    assert err.value.key == "model.modalities" and _one_line(err.value)
    with pytest.raises(DsframeError, match=r"image input 'image' has shape \[6, 3, 28, 28\].*in_channels=1") as err:
        net(**{**batch, "image": torch.randn(6, 3, 28, 28)})
    _one_line(err.value)
    with pytest.raises(DsframeError, match=r"audio input 'audio' has shape \[6, 20, 40\].*n_features=13") as err:
        net(**{**batch, "audio": torch.randn(6, 20, 40)})
    _one_line(err.value)


# -- an outside encoder, registered in-process and through an entry point ---------------------
@dataclass
class DepthConfig:
    kind: str = "depth_mlp"
    cells: int = 16


class DepthEncoder(nn.Module):
    """depth: each of ``cells`` depth readings becomes a token."""

    modality = "depth"
    inputs = ("depth",)
    Config = DepthConfig

    def __init__(self, config, width):
        super().__init__()
        self.config, self.proj = config, nn.Linear(1, width)

    @classmethod
    def build(cls, config, width):
        return cls(config, width)

    def arch(self):
        return {"config": {"kind": self.config.kind, "cells": self.config.cells}}

    @classmethod
    def from_arch(cls, arch, width):
        return cls(DepthConfig(**arch["config"]), width)

    def forward(self, depth):
        return self.proj(depth.unsqueeze(-1)), torch.ones(depth.shape, dtype=torch.bool, device=depth.device)


@pytest.fixture
def depth_encoder():
    registry.encoders.register("depth_mlp", DepthEncoder)
    yield DepthEncoder
    registry.encoders._extra.pop("depth_mlp", None)


def test_outside_encoder_for_a_new_modality_is_built_and_fused(depth_encoder, tmp_path):
    net = model(modalities=["image", "depth"], encoders={"depth": {"kind": "depth_mlp"}}).eval()
    batch = make_batch()
    batch["depth"] = torch.randn(6, 16)
    batch["present_depth"] = torch.tensor([True, True, False, True, True, True])
    logits = net(**inputs(batch))
    assert logits.shape == (6, 10) and net.last_gate.shape == (6, 2) and net.last_gate[2, 1] == 0
    other = {**batch, "depth": batch["depth"] + 1.0}
    assert not torch.allclose(net(**inputs(other))[0], logits[0])  # the depth tokens reach the output
    back = load_model(save_model(net, tmp_path / "d.pt"))
    assert torch.equal(back.eval()(**inputs(batch)), logits)


@pytest.mark.slow
def test_list_shows_the_encoders_group_with_an_outside_encoder(tmp_path):
    dist = tmp_path / "ext_depth-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ext_depth\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dsframe.encoders]\nlidar = ext_depth:Lidar\n")
    (tmp_path / "ext_depth.py").write_text(textwrap.dedent('''
        from torch import nn
        class Lidar(nn.Module):
            """depth: an outside encoder for lidar scans"""
            modality = "depth"
        '''))
    proc = run_cli("list", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    section = proc.stdout[proc.stdout.index("encoders"):]
    for name in ("bert", "resnet", "mfcc", "wav2vec", "lidar"):
        assert name in section
    assert "an outside encoder for lidar scans" in section


# -- latency helper ---------------------------------------------------------------------------
def test_fusion_latency_times_each_part():
    net = model().train()
    out = fusion_latency(net, {k: v[:1] for k, v in make_batch().items()}, reps=4, block=2)
    assert net.training  # mode restored
    for part in ("encoders", "fusion", "decoder", "forward"):
        assert 0 < out[part]["min"] <= out[part]["median"] <= out[part]["max"]
    assert out["batch_size"] == 1 and out["reps"] == 4 and out["fusion_kind"] == "sigmoid_gate"


# -- stage-level model overrides (core) -------------------------------------------------------
MM_RUN = ("recipe=sentiment", "model=multimodal", "model/encoders/text=tiny", "data.tokenizer=minilm")


def test_stage_model_override_builds_that_stage_model(compose, tmp_path):
    spec = validate(compose(*MM_RUN, "+recipe.stages.finetune.model.modalities=[image]",
                            "+recipe.stages.finetune.model.encoders.image.channels=16"))
    assert spec.model.modalities == ["text", "image", "audio"]  # the top-level model is untouched
    staged = spec.stage_model("finetune")
    assert staged.modalities == ["image"] and staged.encoders["image"]["channels"] == 16
    assert staged.encoders["image"]["blocks"] == [1, 1, 1]  # deep merge keeps the other options
    ctx = StageContext(run_dir=tmp_path, stage_name="finetune", cfg=spec.cfg, stage=spec.recipe.stages["finetune"])
    built = Runner(spec, tmp_path).build_model(ctx)
    assert built.modalities == ["image"] and built.encoders["image"].stem[0].out_channels == 16


def test_stage_model_override_that_changes_an_encoder_kind_replaces_its_options(compose):
    spec = validate(compose(*MM_RUN, "+recipe.stages.finetune.model.encoders.audio.kind=wav2vec",
                            "+recipe.stages.finetune.model.encoders.audio.channels=32"))
    audio = spec.stage_model("finetune").encoders["audio"]
    assert audio["kind"] == "wav2vec" and audio["channels"] == 32 and "n_features" not in audio
    assert spec.model.encoders["audio"]["kind"] == "mfcc"


@pytest.mark.parametrize("override,key,says", [
    ("+recipe.stages.finetune.model.fusion=gmu", "recipe.stages.finetune.model.fusion", "exactly 2"),
    ("+recipe.stages.finetune.model.kind=bert", "recipe.stages.finetune.model.kind", "not its kind"),
    ("+recipe.stages.finetune.model.nope=1", "recipe.stages.finetune.model.nope", "a key of"),
    ("+recipe.stages.finetune.model.encoders.audio.kind=resnet", "recipe.stages.finetune.model.encoders.audio.kind",
     "an encoder for 'audio'"),
    ("+recipe.stages.finetune.trainer.devices=0", "recipe.stages.finetune.trainer.devices", ">= 1"),
])
def test_bad_stage_model_override_fails_at_validation(compose, override, key, says):
    with pytest.raises(ConfigError) as err:
        validate(compose(*MM_RUN, override))
    assert err.value.key == key and says in _one_line(err.value)


def test_stage_model_override_with_init_from_is_rejected(compose):
    with pytest.raises(ConfigError, match="whose architecture is fixed") as err:
        validate(compose(*MM_RUN, "+recipe.stages.second.init_from=finetune",
                         "+recipe.stages.second.model.width=64"))
    assert err.value.key == "recipe.stages.second.model"


# -- real fits: ddp with 2 forked ranks, distillation fused -> fused --------------------------
@dataclass
class SynthConfig:
    kind: str = "mm_synth"
    samples: int = 96
    batch_size: int = 16
    eval_batch_size: int = 32
    seed: int = 0


class _Synth(Dataset):
    """Digits in three noisy modalities; each sample lacks some modalities (never all)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 10, (n,), generator=g)
        proto_img, proto_aud = torch.randn(10, 1, 28, 28, generator=g), torch.randn(10, 1, 13, generator=g)
        self.image = proto_img[self.labels] + torch.randn(n, 1, 28, 28, generator=g)
        self.audio = proto_aud[self.labels].expand(n, 20, 13) + torch.randn(n, 20, 13, generator=g)
        self.ids = torch.stack([self.labels + 10, torch.randint(5, 1000, (n,), generator=g)], 1)
        self.present = torch.rand(n, 3, generator=g) < 0.7
        self.present[~self.present.any(1), 1] = True

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        p = self.present[i]
        return {"labels": self.labels[i], "input_ids": self.ids[i] * p[0], "attention_mask": torch.ones(2).long(),
                "image": self.image[i] * p[1], "audio": self.audio[i] * p[2],
                "audio_mask": torch.ones(20, dtype=torch.bool) & p[2],
                "present_text": p[0], "present_image": p[1], "present_audio": p[2]}


class SynthData(pl.LightningDataModule):
    description = "synthetic three-modality digits (tests)"
    Config = SynthConfig
    modalities = MODALITIES
    num_classes = 10

    def __init__(self, config):
        super().__init__()
        self.config, self.batch_size = config, config.batch_size
        self.sets = {s: _Synth(config.samples if s == "train" else 32, config.seed + i)
                     for i, s in enumerate(("train", "val", "test"))}

    def train_dataloader(self):
        return DataLoader(self.sets["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.sets["val"], batch_size=self.config.eval_batch_size)

    def test_dataloader(self):
        return DataLoader(self.sets["test"], batch_size=self.config.eval_batch_size)


@dataclass
class WeightsProbeConfig:
    out: str = ""


class WeightsProbe(Plugin):
    """Writes, per rank, the world size and checksums of the weights before and after training."""

    name = "weights_probe"
    Config = WeightsProbeConfig

    def on_train_start(self, trainer, pl_module):
        self.start = _checksum(pl_module.model)

    def on_train_end(self, trainer, pl_module):
        path = os.path.join(self.config.out, f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"world": trainer.world_size, "start": self.start, "end": _checksum(pl_module.model),
                       "steps": trainer.global_step}, f)


def _checksum(module: nn.Module) -> float:
    return sum(float(p.double().sum()) for p in module.parameters())


@pytest.fixture
def synth_run(compose, tmp_path):
    registry.data.register("mm_synth", SynthData)
    registry.plugins.register("weights_probe", WeightsProbe)

    def make(*overrides):
        cfg = compose("recipe=sentiment", "model=multimodal", "model/encoders/text=tiny", "data.tokenizer=minilm",
                      *(f"model.{k}={v}" for k, v in (("width", 32), ("heads", 2), ("hidden", 32))),
                      "model.encoders.image.channels=8", "model.encoders.image.groups=4",
                      "model.encoders.image.blocks=[1,1]", "model.encoders.audio.layers=1",
                      "model.modality_dropout=0.2", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                      "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                      "trainer.enable_progress_bar=false", "optim.lr=1e-3", "threads=1", *overrides)
        OmegaConf.set_struct(cfg, False)
        cfg.data = {"kind": "mm_synth"}
        return validate(cfg)

    yield make
    registry.data._extra.pop("mm_synth", None)
    registry.plugins._extra.pop("weights_probe", None)


@pytest.mark.slow
def test_fused_model_trains_under_ddp_with_two_forked_ranks(synth_run, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    spec = synth_run("strategy=ddp", "trainer.devices=2", "+recipe.stages.finetune.plugins=[weights_probe]",
                     f"+plugins.weights_probe.out={probe}")
    results = Runner(spec, tmp_path / "run").run()
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 3 for r in ranks)
    assert ranks[0]["start"] == ranks[1]["start"] and ranks[0]["end"] == ranks[1]["end"]  # replicas in step
    assert ranks[0]["end"] != ranks[0]["start"]  # and they trained
    saved = _checksum(load_model(tmp_path / "run" / "finetune" / "model.pt"))
    assert saved == pytest.approx(ranks[0]["end"], rel=1e-9)  # the parent saved what the ranks trained
    assert math.isfinite(results["finetune"]["fit"]["train/loss"])
    assert 0.0 <= results["finetune"]["test"]["test/acc"] <= 1.0


@pytest.mark.slow
def test_fused_student_distils_from_a_fused_teacher(synth_run, tmp_path):
    """A wide teacher stage, then a narrower student stage (a stage-level model override) trained
    with the distill plugin on logits; its loss is the hand formula on the teacher's logits."""
    from dsframe_distill.plugin import DistillConfig, DistillPlugin

    spec = synth_run("model.width=64",
                     "+recipe.stages.student.plugins=[distill]", "+recipe.stages.student.model.width=32",
                     "+plugins.distill.teacher=finetune", "+plugins.distill.hidden_weight=0.0")
    results = Runner(spec, tmp_path).run()
    teacher, student = (load_model(tmp_path / s / "model.pt") for s in ("finetune", "student"))
    assert teacher.config.width == 64 and student.config.width == 32
    assert math.isfinite(results["student"]["fit"]["train/loss"])
    # the plugin's loss on one batch, against the formula
    plugin = DistillPlugin(DistillConfig(teacher=str(tmp_path / "finetune" / "model.pt"), alpha=0.6))
    plugin.transform(student.eval())
    batch = next(iter(DataLoader(_Synth(8, 5), batch_size=8)))
    s_logits = student(**inputs(batch))
    ce = F.cross_entropy(s_logits, batch["labels"])
    with torch.no_grad():
        t_logits = teacher.eval()(**inputs(batch))
    ps, pt = torch.log_softmax(s_logits / 3, -1), torch.softmax(t_logits / 3, -1)
    hand = 0.6 * (pt * (pt.log() - ps)).sum(-1).mean() * 9 + 0.4 * ce
    torch.testing.assert_close(plugin.loss(None, batch, s_logits, ce), hand)
    # the layer-to-layer term is BERT-only: asking for it is one clear error before training
    layerwise = DistillPlugin(DistillConfig(teacher=str(tmp_path / "finetune" / "model.pt"), hidden_weight=1.0))
    with pytest.raises(ConfigError, match="hidden_weight=0") as err:
        layerwise.transform(student)
    assert err.value.key == "plugins.distill.hidden_weight" and _one_line(err.value)
