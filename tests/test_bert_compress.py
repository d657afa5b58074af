"""int8 export and the bert_compress recipe end to end (debug=tiny: a random 2-layer BERT),
plus the recipe's bad-input behaviour: one clear error, earlier artifacts untouched."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dsframe.errors import CheckpointError, ConfigError
from dsframe_compress.int8 import OrtModel, export_int8, torch_dynamic_int8
from dsframe_compress.measure import size_mb
from dsframe_prune.plugin import PruneConfig, PrunePlugin
from dsframe_qat.plugin import QatConfig, QATPlugin
from dsframe_qat.scheme import saturates

from tests._compress_util import batch, ensure_compress_registered, logits, tiny_bert


def _confident(model):
    with torch.no_grad():  # random heads give near-tied logits; widen the gaps so argmax is meaningful
        model.classifier.weight.mul_(40.0)
    return model


@pytest.mark.parametrize("scheme", ["w8", "w7"])
@pytest.mark.parametrize("pruned", [False, True])
def test_int8_onnx_is_smaller_and_agrees_with_fp32(tmp_path, pruned, scheme):
    if scheme == "w8" and saturates():
        pytest.skip("no VNNI/AMX on this CPU: 8-bit weights saturate onnxruntime's u8s8 kernels here "
                    "(the reason for w7, which runs below; tests/test_int8_scheme.py emulates the overflow)")
    model = _confident(tiny_bert(vocab=2000, hidden=64, heads=4, ffn=256))
    if pruned:
        p = PrunePlugin(PruneConfig(amount=0.5))
        p.transform(model)
        p.finalize(model)
    info = export_int8(model, tmp_path, seq_len=16, scheme=scheme)
    assert info["scheme"] == scheme
    # onnxruntime fused both (pruned) layers' LayerNorms and GELUs (attention fusion depends on
    # the onnxruntime version's patterns; it saves nothing measurable on CPU)
    assert info["fused_ops"].get("SkipLayerNormalization") == 2 * 2 + 1
    assert info["fused_ops"].get("BiasGelu") == 2
    assert size_mb(info["onnx_int8"]) < 0.45 * size_mb(info["onnx"])
    b = batch(n=32, seq=16, vocab=2000, seed=7)
    ref = logits(model, b)
    fp32 = OrtModel(info["onnx"])(b["input_ids"], b["attention_mask"])
    int8 = OrtModel(info["onnx_int8"])(b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(fp32, ref, atol=1e-4, rtol=1e-4)
    assert not torch.equal(int8, ref)
    scale = ref.abs().max()
    assert float((int8 - ref).abs().max()) < 0.1 * float(scale)
    assert float((int8.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.9


def _int8_weight_error(model, onnx_path) -> float:
    """Largest distance, in int8 steps, between a dequantized onnxruntime weight and the
    torch Linear weight it came from."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    linears = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    worst = 0.0
    for name, q in inits.items():
        if not name.endswith("_quantized") or q.ndim != 2:
            continue
        scale = torch.from_numpy(inits[name[:-len("_quantized")] + "_scale"])
        deq = (torch.from_numpy(q).float() * scale).T  # [out, in] like nn.Linear
        cands = [(deq - w).abs().max() / scale.max() for w in linears if w.shape == deq.shape]
        worst = max(worst, float(min(cands)))
    return worst


def test_qat_weights_are_exactly_what_onnxruntime_int8_stores(tmp_path):
    plain = tiny_bert(vocab=500, hidden=64, ffn=256)
    qat = tiny_bert(vocab=500, hidden=64, ffn=256)
    q = QATPlugin(QatConfig())
    q.transform(qat)
    q.finalize(qat)
    err = {}
    for name, m in (("plain", plain), ("qat", qat)):
        info = export_int8(m, tmp_path / name, seq_len=16, fuse=False)
        err[name] = _int8_weight_error(m, info["onnx_int8"])
    assert err["qat"] < 1e-3  # QAT's baked grid == onnxruntime's per-channel symmetric int8
    assert err["plain"] > 0.1  # an fp32 model loses up to half a step per weight


def test_torch_dynamic_int8_runs_int8_linear():
    model = _confident(tiny_bert())
    q = torch_dynamic_int8(model)
    assert "quantized" in type(q.encoder.encoder.layer[0].intermediate.dense).__module__
    b = batch()
    assert float((logits(q, b).argmax(-1) == logits(model, b).argmax(-1)).float().mean()) >= 0.75


# -- the recipe --------------------------------------------------------------------------------

def _compose(*overrides):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import dsframe.cli  # noqa: F401  (registers the run-dir resolver)

    GlobalHydra.instance().clear()
    with initialize_config_module("dsframe.conf", version_base="1.3"):
        return compose("config", overrides=["recipe=bert_compress", "debug=tiny", *overrides])


def _run(run_dir, *overrides):
    from dsframe.config import validate
    from dsframe.runner import Runner

    ensure_compress_registered()
    return Runner(validate(_compose("trainer.enable_progress_bar=false", *overrides)), run_dir).run()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _datamodule(run_dir):
    from omegaconf import OmegaConf

    from dsframe import registry
    from dsframe.config.structured import to_dataclass

    cfg = OmegaConf.load(run_dir / "config.yaml")
    cls = registry.data.get(cfg.data.kind, key="data.kind")
    dm = cls(to_dataclass(cls.Config, cfg.data, "data"))
    dm.setup("fit")
    dm.setup("test")
    return dm


FAST_EVAL = ("recipe.stages.evaluate.options.sentences=16", "recipe.stages.evaluate.options.threads=[1]")


@pytest.mark.slow
def test_bert_compress_debug_end_to_end(tmp_path, caplog):
    import logging
    import os

    import onnx
    from onnx import numpy_helper

    from dsframe.machine import cpu_model
    from dsframe.models.files import load_model
    from dsframe_qat.scheme import choose_scheme

    caplog.set_level(logging.INFO, logger="dsframe")
    results = _run(tmp_path, *FAST_EVAL)
    # long non-training stages report their progress (a bar on a terminal, log lines elsewhere)
    assert any(r.getMessage().startswith("stage export: export: 4/4 (100%)") for r in caplog.records)
    for stage in ("teacher", "prune", "qat"):
        assert (tmp_path / stage / "model.pt").exists()
        assert "test" not in results[stage]  # the test split is read once, by evaluate
    assert (tmp_path / "export" / "model_int8.onnx").exists()
    prune_log = json.loads((tmp_path / "prune" / "prune.json").read_text())
    assert prune_log["final"]["heads"] == [2, 2] and len(prune_log["history"]) >= 1
    rep = json.loads((tmp_path / "report.json").read_text())
    models = rep["models"]
    assert set(models) == {"teacher", "prune", "qat", "int8", "teacher_ort_fp32", "teacher_ort_int8"}
    for row in models.values():
        assert set(row["latency_ms"]) == {"b1_t1", "b8_t1", "test_b1_t1", "test_b8_t1"}
        for k, med in row["latency_ms"].items():
            assert row["latency_min_ms"][k] <= med <= row["latency_max_ms"][k]

    # accuracy: every row's figure is its predictions against the test labels, and the teacher's
    # predictions are what the teacher computes on the test split
    dm = _datamodule(tmp_path)
    saved = json.loads((tmp_path / "evaluate" / "test_preds.json").read_text())
    labels = torch.tensor(saved["labels"])
    assert labels.tolist() == list(dm.splits["test"].labels)
    for name, row in models.items():
        p = torch.tensor(saved["preds"][name])
        assert row["n"] == len(labels) and row["acc"] == pytest.approx(100 * float((p == labels).float().mean()), abs=1e-3)
    teacher = load_model(tmp_path / "teacher" / "model.pt").eval()
    mine = torch.cat([logits(teacher, b).argmax(-1) for b in dm.test_dataloader()])
    assert mine.tolist() == saved["preds"]["teacher"]
    pair = rep["paired"]["int8_vs_teacher"]
    p8, pt = torch.tensor(saved["preds"]["int8"]), torch.tensor(saved["preds"]["teacher"])
    assert pair["only_a_right"] == int(((p8 == labels) & (pt != labels)).sum()) and pair["n"] == len(labels)

    # sizes are the files' sizes; the int8 file is much smaller than the fp32 teacher's
    assert models["teacher"]["size_mb"] == pytest.approx(os.path.getsize(tmp_path / "teacher" / "model.pt") / 2**20, abs=1e-3)
    int8_mb = os.path.getsize(tmp_path / "export" / "model_int8.onnx") / 2**20
    assert models["int8"]["size_mb"] == pytest.approx(int8_mb, abs=1e-3)
    assert models["int8"]["size_ratio"] > 5  # 7.8 MB fp32 -> 0.8 MB: int8 weights and pruned vocabulary
    assert models["int8"]["size_mb"] < models["int8"]["size_mb_full_vocab"] < models["teacher_ort_int8"]["size_mb"] + 0.5
    assert models["prune"]["params"] < models["teacher"]["params"]

    exp = results["export"]
    assert exp["max_abs_diff_fp32"] < 1e-3  # the fp32 ONNX graph is the torch model
    # the portable folder (tests/test_portable_export.py runs it without dsframe)
    assert exp["labels"] == ["negative", "positive"]
    assert json.loads((tmp_path / "export" / "predict.json").read_text())["max_length"] == dm.config.max_length
    assert all((tmp_path / "export" / f).is_file() for f in ("predict.py", "model.pt2", "tokenizer/tokenizer.json"))
    # the int8 artifact: the scheme this machine needs, recorded with the machine
    assert exp["scheme"] == models["int8"]["scheme"] == choose_scheme() and exp["machine"]["cpu_model"] == cpu_model()
    md = (tmp_path / "report.md").read_text()
    assert "| int8 | onnxruntime int8" in md and cpu_model() in md and "teacher_ort_fp32" in md
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    # agreement is the share of a validation batch on which int8 and the QAT model agree
    from dsframe_compress.int8 import OrtModel as Ort

    vb = next(iter(dm.val_dataloader()))
    qat = load_model(tmp_path / "qat" / "model.pt")
    agree = (Ort(tmp_path / "export" / "model_int8.onnx")(vb["input_ids"], vb["attention_mask"]).argmax(-1)
             == logits(qat, vb).argmax(-1)).float().mean()
    assert exp["argmax_agreement_int8"] == pytest.approx(100 * float(agree), abs=0.01)
    # vocabulary pruning keeps exactly the rows of the training split's tokens (+ special tokens)
    used = {i for row in dm.splits["train"].encodings["input_ids"] for i in row} | set(dm.tokenizer.all_special_ids)
    assert exp["vocab_rows_kept"] == len(used) < 30522
    tables = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "export" / "model_int8.onnx")).graph.initializer
              if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 and i.dims[1] == 64]
    assert len(used) in {t.shape[0] for t in tables}

    # a corrupt artifact of a finished stage: one clear error, nothing else touched
    before = {p: _digest(p) for p in tmp_path.rglob("*.pt")}
    (tmp_path / "qat" / "model.pt").write_bytes(b"garbage")
    (tmp_path / "export" / "stage.json").unlink()
    with pytest.raises(CheckpointError, match="corrupt"):
        _run(tmp_path, "recipe.stages.evaluate.options.sentences=16")
    for p, d in before.items():
        if p.parent.name != "qat":
            assert _digest(p) == d, p


def test_bad_prune_amount_fails_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"plugins\.prune\.amount=1\.5.*\[0, 1\)"):
        _run(tmp_path, "plugins.prune.amount=1.5")
    assert not any(tmp_path.rglob("model.pt"))


def test_teacher_of_another_architecture_fails_the_stage_cleanly(tmp_path):
    from dsframe.models.files import save_model

    other = save_model(tiny_bert(num_labels=3), tmp_path / "other_teacher.pt")
    with pytest.raises(CheckpointError, match="another architecture"):
        _run(tmp_path / "run", f"plugins.distill.teacher={other}")
    assert (tmp_path / "run" / "teacher" / "model.pt").exists()  # the finished teacher stage is kept
    assert not (tmp_path / "run" / "prune" / "model.pt").exists()


def test_vocabulary_pruning_of_the_int8_artifact(tmp_path):
    from dsframe_compress.int8 import nearest_rows

    model = _confident(tiny_bert(vocab=3000, hidden=64, ffn=128))
    keep = torch.arange(0, 1000)  # the "training split" used ids 0..999 only
    full = export_int8(model, tmp_path / "full", seq_len=16)
    small = export_int8(model, tmp_path / "small", seq_len=16, keep_token_ids=keep, unk_id=100, unseen="nearest")
    as_unk = export_int8(model, tmp_path / "unk", seq_len=16, keep_token_ids=keep, unk_id=100, unseen="unk")
    coded = export_int8(model, tmp_path / "pq", seq_len=16, keep_token_ids=keep, unk_id=100)  # unseen="pq"
    assert size_mb(small["onnx_int8"]) < size_mb(full["onnx_int8"]) - 0.9 * 2000 * 64 / 2**20
    assert size_mb(small["onnx_int8"]) < size_mb(coded["onnx_int8"]) < size_mb(full["onnx_int8"])
    b = batch(n=8, seq=16, vocab=1000, seed=4)  # only kept ids: same function as the full table
    f, s, u, q = (OrtModel(x["onnx_int8"]) for x in (full, small, as_unk, coded))
    m = b["attention_mask"]
    for pruned in (s, u, q):
        torch.testing.assert_close(pruned(b["input_ids"], m), f(b["input_ids"], m), atol=1e-5, rtol=0)
    # a dropped id reads the kept row most similar to its own embedding ...
    emb = model.encoder.embeddings.word_embeddings.weight.detach()
    twin = int(nearest_rows(emb[2500:2501], emb[:1000])[0])
    cos = torch.nn.functional.cosine_similarity(emb[2500:2501], emb[:1000])
    assert twin == int(cos.argmax()) and twin != 100
    unseen, read_twin, read_unk = (b["input_ids"].clone() for _ in range(3))
    unseen[:, 3], read_twin[:, 3], read_unk[:, 3] = 2500, twin, 100
    torch.testing.assert_close(s(unseen, m), f(read_twin, m), atol=1e-5, rtol=0)
    # ... or, with unseen="unk", [UNK]'s row
    torch.testing.assert_close(u(unseen, m), f(read_unk, m), atol=1e-5, rtol=0)
    assert not torch.allclose(f(read_twin, m), f(read_unk, m))
    # with unseen="pq" (the default) it reads its own product-quantized row (exactness of that
    # path: the next test; its quality on real embeddings: tests/test_pq.py, docs/compression.md)
    assert not torch.allclose(q(unseen, m), u(unseen, m)) and not torch.allclose(q(unseen, m), s(unseen, m))


def test_product_quantized_rows_export_to_onnx_exactly(tmp_path):
    import copy

    from dsframe_compress.int8 import Int8RowEmbedding, export_onnx

    model = _confident(tiny_bert(vocab=3000, hidden=64, ffn=128)).eval()
    keep = torch.arange(0, 1000)
    path = export_onnx(model, tmp_path / "pq.onnx", seq_len=16, int8_embeddings=True, keep_token_ids=keep,
                       unk_id=100, unseen="pq")
    ref = copy.deepcopy(model)
    emb = ref.encoder.embeddings
    emb.word_embeddings = Int8RowEmbedding(emb.word_embeddings.weight, 0, keep, 100, "pq")
    for name in ("position_embeddings", "token_type_embeddings"):
        setattr(emb, name, Int8RowEmbedding(getattr(emb, name).weight))
    b = batch(n=4, seq=16, vocab=3000, seed=5)  # ids from the whole vocabulary, mostly coded rows
    torch.testing.assert_close(OrtModel(path)(b["input_ids"], b["attention_mask"]), logits(ref, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["prune", "qat", "distill"])
def test_plugin_yaml_equals_dataclass_defaults(name):
    import dataclasses
    from pathlib import Path

    from omegaconf import OmegaConf

    import dsframe_distill.plugin
    import dsframe_prune.plugin
    import dsframe_qat.plugin

    cls = {"prune": dsframe_prune.plugin.PrunePlugin, "qat": dsframe_qat.plugin.QATPlugin,
           "distill": dsframe_distill.plugin.DistillPlugin}[name]
    path = Path(__file__).resolve().parents[1] / "dsframe" / "conf" / "plugins" / f"{name}.yaml"
    assert path.read_text().startswith(f"# @package plugins.{name}\n")
    assert OmegaConf.to_container(OmegaConf.load(path)) == dataclasses.asdict(cls.Config())


def test_recipe_exposes_every_plugin_option():
    cfg = _compose("plugins.prune.drop_layers=1", "plugins.qat.activations=per_tensor")
    assert cfg.plugins.prune.drop_layers == 1 and cfg.plugins.prune.amount == 0.5
    assert cfg.plugins.qat.activations == "per_tensor" and cfg.plugins.distill.temperature == 3.0
    assert list(cfg.recipe.stages) == ["teacher", "prune", "qat", "export", "evaluate", "report"]


def _installed() -> bool:
    from dsframe import registry

    return {"prune", "qat", "distill"} <= set(registry.plugins.names()) and \
        "compress_export" in registry.stages.names()


@pytest.mark.skipif(not _installed(), reason="entry points of the compression plugins are not installed")
def test_cli_bad_amount_is_one_line_and_exit_1(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("recipe=bert_compress", "debug=tiny", "plugins.prune.amount=1.5", f"hydra.run.dir={tmp_path}",
                   cwd=tmp_path)
    assert proc.returncode == 1
    err = [line for line in proc.stderr.splitlines() if line.startswith("dsframe: error:")]
    assert len(err) == 1 and "plugins.prune.amount=1.5" in err[0] and "[0, 1)" in err[0]
    assert "Traceback" not in proc.stderr
