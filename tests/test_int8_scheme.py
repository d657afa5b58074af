"""The int8 weight grid follows the CPU: 7-bit weights where onnxruntime's u8s8 kernels saturate
(x86 without VNNI/AMX), 8-bit elsewhere; QAT trains on exactly the grid the export stores; the
int8 file says which grid and machine it was built for, and warns where it would saturate."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dsframe.machine
from dsframe.errors import ConfigError
from dsframe_compress.int8 import OrtModel, export_int8, read_metadata
from dsframe_qat.plugin import QatConfig, QATPlugin, prepare_qat
from dsframe_qat import scheme as S

from tests._compress_util import batch, tiny_bert

AVX2_ONLY = {"sse2", "avx", "avx2", "fma"}                       # the AMD EPYC of issue 10
AVX512_NO_VNNI = AVX2_ONLY | {"avx512f", "avx512bw"}             # Skylake-SP: vpmaddubsw too
VNNI = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_vnni"}        # Cascade Lake, Zen 4 (this machine)
AVX_VNNI = AVX2_ONLY | {"avx_vnni"}                              # Alder Lake
AMX = VNNI | {"amx_tile", "amx_int8", "amx_bf16"}                # Sapphire Rapids
ARM = {"fp", "asimd", "asimddp", "i8mm"}                         # Graviton 3


@pytest.fixture
def flags(monkeypatch):
    """Pretend to run on a CPU with the given flags (``dsframe.machine.cpu_flags``)."""
    def use(fl):
        monkeypatch.setattr(dsframe.machine, "cpu_flags", lambda: frozenset(fl))
        monkeypatch.setattr(S, "_warned", set())
    return use


@pytest.mark.parametrize("fl,expected", [(AVX2_ONLY, "w7"), (AVX512_NO_VNNI, "w7"), (VNNI, "w8"),
                                         (AVX_VNNI, "w8"), (AMX, "w8"), (ARM, "w8")])
def test_scheme_is_chosen_from_the_cpu_flags(flags, fl, expected):
    flags(fl)
    assert S.choose_scheme() == expected
    assert S.saturates() == (expected == "w7")
    assert S.resolve_scheme("auto").name == expected
    # an explicit scheme is kept whatever the machine
    assert S.resolve_scheme("w8").qmax == 127 and S.resolve_scheme("w7").qmax == 64


def test_bad_scheme_names_the_key():
    with pytest.raises(ConfigError, match=r"plugins\.qat\.scheme='w6'.*auto \| w8 \| w7"):
        QatConfig(scheme="w6")


def _ort_weights(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(int8 values [out, in], scale [out]) of every per-channel quantized MatMul weight."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    return [(q.T, inits[n[:-len("_quantized")] + "_scale"]) for n, q in inits.items()
            if n.endswith("_quantized") and q.ndim == 2]


def _fake_quantized(model) -> list[torch.Tensor]:
    from torchao.quantization.qat import FakeQuantizedLinear

    with torch.no_grad():
        return [m.weight_fake_quantizer(m.weight) for m in model.modules() if isinstance(m, FakeQuantizedLinear)]


@pytest.mark.parametrize("scheme,qmax", [("w8", 127), ("w7", 64)])
def test_qat_trains_on_exactly_the_grid_onnxruntime_stores(tmp_path, scheme, qmax):
    model = tiny_bert(vocab=300, hidden=64, ffn=128)
    plugin = QATPlugin(QatConfig(scheme=scheme))
    plugin.transform(model)
    with torch.no_grad():  # move the weights off any grid, as training does
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = _fake_quantized(model)  # what the forward pass used while training
    plugin.finalize(model)
    stored = _ort_weights(export_int8(model, tmp_path, seq_len=16, fuse=False, scheme=scheme)["onnx_int8"])
    assert len(stored) == len(trained) == 2 * 6 + 1  # q, k, v, o, ffn in/out per layer + classifier
    for w in trained:
        q, s = next((q, s) for q, s in stored if q.shape == tuple(w.shape)
                     and np.allclose(q * s[:, None], w.numpy(), atol=1e-3))
        assert np.abs(q).max() == qmax  # the row maximum sits on the grid's end
        # the weights trained through fake quant are the ones int8 onnxruntime multiplies, to the
        # last bit but one (an fp32 weight off the grid would be up to half a step = 0.4 % away)
        np.testing.assert_allclose(q.astype(np.float32) * s[:, None], w.numpy(), rtol=3e-7, atol=0)
        np.testing.assert_array_equal(q, np.round(w.numpy() / s[:, None]))


def _u8s8_avx2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [M, K] uint8 @ b [K, N] int8 the way AVX2's vpmaddubsw does it: adjacent products along K
    added in pairs into a saturating int16, then summed in int32."""
    prod = a[:, :, None].astype(np.int32) * b[None].astype(np.int32)
    pairs = np.clip(prod[:, 0::2] + prod[:, 1::2], -32768, 32767)
    return pairs.sum(axis=1)


@pytest.mark.parametrize("scheme,exact", [("w8", False), ("w7", True)])
def test_w7_never_saturates_u8s8_pairs_and_w8_does(tmp_path, scheme, exact):
    model = tiny_bert(vocab=300, hidden=64, ffn=128)
    g = np.random.default_rng(0)
    a = g.integers(200, 256, size=(64, 64), dtype=np.int64).astype(np.uint8)  # large activations
    mismatched = 0
    for q, _ in _ort_weights(export_int8(model, tmp_path, seq_len=16, fuse=False, scheme=scheme)["onnx_int8"]):
        b = q.T[:64]  # [K, N]
        exact_out = a[:, :b.shape[0]].astype(np.int64) @ b.astype(np.int64)
        mismatched += int((_u8s8_avx2(a[:, :b.shape[0]], b) != exact_out).sum())
    assert (mismatched == 0) == exact


@pytest.mark.parametrize("fl,scheme", [(AVX2_ONLY, "w7"), (VNNI, "w8")])
def test_auto_export_records_scheme_and_machine_in_onnx_metadata(tmp_path, flags, fl, scheme):
    flags(fl)
    info = export_int8(tiny_bert(vocab=300, hidden=64, ffn=128), tmp_path, seq_len=16, fuse=False)  # auto
    meta = read_metadata(info["onnx_int8"])
    assert info["scheme"] == meta["int8_scheme"] == scheme
    assert meta["reduce_range"] == ("true" if scheme == "w7" else "false")
    assert meta["weight_qmax"] == str(S.SCHEMES[scheme].qmax)
    assert meta["built_on_flags"].split() == sorted(f for f in dsframe.machine.RELEVANT_FLAGS if f in fl)
    assert meta["built_on_cpu"] == dsframe.machine.cpu_model()
    assert max(int(np.abs(q).max()) for q, _ in _ort_weights(info["onnx_int8"])) == S.SCHEMES[scheme].qmax
    assert OrtModel(info["onnx_int8"]).metadata == meta  # what a session reads back


def test_w8_model_on_a_saturating_cpu_warns_once_in_one_line(tmp_path, flags):
    flags(VNNI)
    w8 = export_int8(tiny_bert(), tmp_path / "w8", seq_len=16, fuse=False)["onnx_int8"]
    w7 = export_int8(tiny_bert(), tmp_path / "w7", seq_len=16, fuse=False, scheme="w7")["onnx_int8"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OrtModel(w8)  # built for and run on a VNNI CPU: silent
    flags(AVX2_ONLY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OrtModel(w7)  # 7-bit weights are exact everywhere: silent
    with pytest.warns(RuntimeWarning) as rec:
        OrtModel(w8)
    msg = str(rec[0].message)
    assert len(rec) == 1 and "\n" not in msg and "w8" in msg and "saturate" in msg and "w7" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OrtModel(w8)  # once per process


def test_export_stage_follows_the_grid_qat_trained_on(tmp_path, flags):
    from dsframe.io import write_json
    from dsframe_compress.stages import export_scheme

    key = "recipe.stages.export.options.scheme"
    flags(AVX2_ONLY)
    assert export_scheme("auto", tmp_path / "prune", key)[0] == "w7"  # no QAT: this machine's
    assert export_scheme("w8", tmp_path / "prune", key)[0] == "w8"    # explicit: kept
    write_json(tmp_path / "qat" / "qat.json", {"scheme": "w8"})       # trained on a VNNI machine
    assert export_scheme("auto", tmp_path / "qat", key)[0] == "w8"
    with pytest.raises(ConfigError, match=r"options\.scheme='w7'.*auto or w8"):
        export_scheme("w7", tmp_path / "qat", key)
    with pytest.raises(ConfigError, match=r"options\.scheme='int4'"):
        export_scheme("int4", tmp_path / "qat", key)


def test_qat_plugin_writes_the_resolved_scheme(tmp_path, flags):
    import json
    from types import SimpleNamespace

    flags(AVX2_ONLY)
    plugin = QATPlugin(QatConfig(), SimpleNamespace(stage_dir=tmp_path))
    model = plugin.transform(tiny_bert())
    assert {m.weight_fake_quantizer.qmax for m in model.modules() if type(m).__name__ == "FakeQuantizedLinear"} == {64}
    plugin.finalize(model)
    rec = json.loads((tmp_path / "qat.json").read_text())
    assert rec["scheme"] == "w7" and rec["requested"] == "auto" and rec["reduce_range"] is True
    assert rec["machine"]["cpu_flags"] == ["avx2"]


def test_prepare_keeps_embeddings_at_8_bits_under_w7():
    model = prepare_qat(tiny_bert(), scheme="w7")
    fq = model.encoder.embeddings.word_embeddings.weight_fake_quantizer
    assert fq.qmax == 127
    x = batch()
    assert model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).shape == (4, 2)
