"""qat plugin: torchao fake-quant prepare -> convert gives plain modules with weights on the
int8 grid; it composes with prune and distill in one Lightning stage in any order."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dsframe.errors import ConfigError
from dsframe_compress import structure as S
from dsframe_qat.plugin import QatConfig, QATPlugin, prepare_qat

from tests._compress_util import batch, ensure_bert_registered, logits, tiny_bert


def test_prepare_swaps_linear_and_embedding_modules():
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    model = tiny_bert()
    ref = logits(model, batch())
    QATPlugin(QatConfig()).transform(model)
    assert isinstance(model.encoder.encoder.layer[0].attention.self.query, FakeQuantizedLinear)
    assert isinstance(model.encoder.embeddings.word_embeddings, FakeQuantizedEmbedding)
    assert isinstance(model.classifier, FakeQuantizedLinear)
    skipped = tiny_bert()
    QATPlugin(QatConfig(skip=["classifier"], embeddings=False)).transform(skipped)
    assert type(skipped.classifier) is nn.Linear
    assert type(skipped.encoder.embeddings.word_embeddings) is nn.Embedding
    out = logits(model, batch())
    assert not torch.equal(out, ref)  # fake quantization changes the numbers ...
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.1)  # ... a little


@pytest.mark.parametrize("scheme,qmax", [("w8", 127), ("w7", 64)])
def test_convert_bakes_weights_onto_the_int8_grid(scheme, qmax):
    model = tiny_bert()
    plugin = QATPlugin(QatConfig(scheme=scheme))
    plugin.transform(model)
    fq_out = logits(model, batch())
    plugin.finalize(model)
    assert not any("FakeQuantized" in type(m).__name__ for m in model.modules())
    w = model.encoder.encoder.layer[1].intermediate.dense.weight.detach()
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    q = w / scale
    torch.testing.assert_close(q, q.round(), atol=1e-3, rtol=0)
    assert int(q.round().unique().numel()) > 50  # really integer-valued, not collapsed
    assert int(q.round().abs().max()) == qmax
    e = model.encoder.embeddings.word_embeddings.weight.detach()
    qe = e / (e.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)  # row 0 = padding, all 0
    torch.testing.assert_close(qe, qe.round(), atol=1e-3, rtol=0)
    # converted fp32 model (no activation fake-quant) stays close to the QAT model
    torch.testing.assert_close(logits(model, batch()), fq_out, atol=0.1, rtol=0.1)


def test_qat_trains_through_fake_quant():
    model = tiny_bert()
    prepare_qat(model)
    b = batch()
    before = model.encoder.encoder.layer[0].attention.self.query.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    torch.nn.functional.cross_entropy(out, b["labels"]).backward()
    opt.step()
    assert not torch.equal(model.encoder.encoder.layer[0].attention.self.query.weight, before)


def test_qat_twice_is_refused():
    model = tiny_bert()
    prepare_qat(model)
    from dsframe.errors import DsframeError

    with pytest.raises(DsframeError, match="fake-quantized already"):
        prepare_qat(model)


def test_bad_qat_config():
    with pytest.raises(ConfigError, match="plugins.qat.bits"):
        QatConfig(bits=4)


@pytest.mark.parametrize("order", list(itertools.permutations(["prune", "qat", "distill"])))
def test_prune_qat_distill_in_one_stage_any_order(tmp_path, order):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from dsframe.models.files import load_model, save_model
    from dsframe.plugin import order_plugins
    from dsframe.task import ClassificationTask
    from dsframe_distill.plugin import DistillConfig, DistillPlugin
    from dsframe_prune.plugin import PruneConfig, PrunePlugin

    ensure_bert_registered()
    teacher_path = save_model(tiny_bert(seed=5), tmp_path / "teacher.pt")
    make = {"prune": lambda: PrunePlugin(PruneConfig(amount=0.5, every_n_steps=2)),
            "qat": lambda: QATPlugin(QatConfig()),
            "distill": lambda: DistillPlugin(DistillConfig(teacher=str(teacher_path)))}
    plugins = order_plugins([make[n]() for n in order])
    model = tiny_bert()
    for p in plugins:
        model = p.transform(model)
    data = [{k: v[i] for k, v in batch(n=32, seed=3).items()} for i in range(32)]
    task = ClassificationTask(model, plugins)
    trainer = pl.Trainer(max_steps=6, callbacks=plugins, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, DataLoader(data, batch_size=4))
    for p in plugins:
        model = p.finalize(model)
    assert S.shape_summary(model)["heads"] == [2, 2] and S.shape_summary(model)["ffn"] == [32, 32]
    assert not any("FakeQuantized" in type(m).__name__ for m in model.modules())
    again = load_model(save_model(model, tmp_path / "student.pt"))
    torch.testing.assert_close(logits(again, batch()), logits(model, batch()), atol=0, rtol=0)
