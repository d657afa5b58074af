"""distill plugin: the loss is α·KL(p_t‖p_s)·τ² + (1−α)·CE computed by hand; the teacher loads
from a model file; a teacher of another architecture or a corrupt file is one clear error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsframe.errors import CheckpointError, ConfigError
from dsframe.models.files import save_model
from dsframe_distill.plugin import DistillConfig, DistillPlugin, distill_loss

from tests._compress_util import batch, ensure_bert_registered, logits, tiny_bert


def test_distill_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 1, 0])
    ce = F.cross_entropy(s, labels)
    tau, alpha = 3.0, 0.7
    ps, pt = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    hand = alpha * kl * tau ** 2 + (1 - alpha) * ce
    torch.testing.assert_close(distill_loss(s, t, ce, tau, alpha), hand)
    # alpha = 0 is plain CE, identical logits give zero KL
    torch.testing.assert_close(distill_loss(s, t, ce, tau, 0.0), ce)
    torch.testing.assert_close(distill_loss(s, s, ce, tau, 1.0), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_plugin_loads_teacher_and_replaces_loss(tmp_path):
    ensure_bert_registered()
    teacher = tiny_bert(seed=1)
    path = save_model(teacher, tmp_path / "teacher.pt")
    student = tiny_bert(seed=2)
    plugin = DistillPlugin(DistillConfig(teacher=str(path), temperature=3.0, alpha=0.5))
    assert plugin.transform(student) is student
    assert not any(p.requires_grad for p in plugin.teacher.parameters())
    b = batch()
    out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    ce = F.cross_entropy(out, b["labels"])
    new = plugin.loss(None, b, out, ce)
    expected = distill_loss(out, logits(teacher, b), ce, 3.0, 0.5)
    torch.testing.assert_close(new, expected)
    new.backward()  # gradient reaches the student only
    assert student.classifier.weight.grad is not None
    assert all(p.grad is None for p in plugin.teacher.parameters())


def test_teacher_of_another_architecture_is_refused(tmp_path):
    ensure_bert_registered()
    path = save_model(tiny_bert(num_labels=3), tmp_path / "teacher.pt")
    plugin = DistillPlugin(DistillConfig(teacher=str(path)))
    with pytest.raises(CheckpointError, match="another architecture.*num_labels"):
        plugin.transform(tiny_bert())
    path2 = save_model(tiny_bert(hidden=48, heads=4), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="hidden_size"):
        DistillPlugin(DistillConfig(teacher=str(path2))).transform(tiny_bert())


def test_corrupt_or_missing_teacher_is_one_clear_error(tmp_path):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        DistillPlugin(DistillConfig(teacher=str(bad))).transform(tiny_bert())
    with pytest.raises(CheckpointError, match="not found"):
        DistillPlugin(DistillConfig(teacher=str(tmp_path / "nope.pt"))).transform(tiny_bert())


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"alpha": 1.5}])
def test_bad_distill_config(kw):
    with pytest.raises(ConfigError, match="plugins.distill"):
        DistillConfig(**kw)


def _hidden(model, b) -> tuple:
    return model.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         output_hidden_states=True).hidden_states[1:]  # output of each layer


def test_hidden_state_term_pairs_each_student_layer_with_the_teacher_layer_it_came_from(tmp_path):
    import copy

    from dsframe.models.files import load_model
    from dsframe_compress import structure as S
    from dsframe_distill.plugin import layer_pairs, masked_mse

    ensure_bert_registered()
    teacher = tiny_bert(seed=1, layers=4)
    path = save_model(teacher, tmp_path / "teacher.pt")
    student = copy.deepcopy(teacher)
    S.drop_layers(student, [1, 3])
    assert student.encoder.config.layer_origin == [1, 3]
    # the origin survives saving, and a second drop composes with the first
    again = load_model(save_model(student, tmp_path / "student.pt"))
    assert again.encoder.config.layer_origin == [1, 3]
    S.drop_layers(again, [1])
    assert again.encoder.config.layer_origin == [3]
    assert layer_pairs(student, teacher) == [(0, 1), (1, 3)]
    assert layer_pairs(tiny_bert(seed=2, layers=2), teacher) == [(0, 1), (1, 3)]  # no origin: same relative depth

    plugin = DistillPlugin(DistillConfig(teacher=str(path), temperature=2.0, alpha=0.6, hidden_weight=0.5))
    plugin.transform(student)
    plugin.tap_layers(student)  # what on_fit_start does once every plugin has shaped the student
    student.train()
    b = batch(seq=10)
    out = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    ce = F.cross_entropy(out, b["labels"])
    got = plugin.loss(None, b, out, ce)
    with torch.no_grad():
        hs, ht = _hidden(student, b), _hidden(teacher, b)
    m = b["attention_mask"].float()
    by_hand = sum(((hs[i] - ht[j]).pow(2).mean(-1) * m).sum() / m.sum() for i, j in [(0, 1), (1, 3)]) / 2
    torch.testing.assert_close(masked_mse(hs[0], ht[1], b["attention_mask"]),
                               ((hs[0] - ht[1]).pow(2).mean(-1) * m).sum() / m.sum())
    expected = distill_loss(out, logits(teacher, b), ce, 2.0, 0.6) + 0.5 * by_hand
    torch.testing.assert_close(got, expected)
    assert float(by_hand) > 0
    got.backward()
    assert student.encoder.encoder.layer[0].output.dense.weight.grad is not None
    taps = plugin.taps
    plugin.finalize(student)  # hooks removed: forwards no longer record anything
    logits(student, b)
    assert plugin.taps is None and all(not tap.outputs and not tap.handles for tap in taps)


def test_hidden_weight_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"plugins\.distill\.hidden_weight=-1"):
        DistillConfig(hidden_weight=-1.0)
