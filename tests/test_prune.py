"""prune plugin: physical head/FFN slicing is exact, importance mixes L1 and Taylor, gradual
schedule, the pruned model saves and reloads at its own shapes, bad amounts are refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dsframe.errors import CheckpointError, ConfigError
from dsframe.models.files import load_model, save_model
from dsframe_compress import structure as S
from dsframe_prune.plugin import PruneConfig, PrunePlugin, cubic_schedule

from tests._compress_util import batch, ensure_bert_registered, logits, tiny_bert


def _grads(model, b):
    model.train()
    model.zero_grad()
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    F.cross_entropy(out, b["labels"]).backward()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sliced_model_equals_masked_model(attn):
    model = tiny_bert(attn=attn)
    b = batch()
    plugin = PrunePlugin(PruneConfig(amount=0.5, taylor_weight=0.0))
    plugin.transform(model)
    plugin.update_masks(0.5, 0.5)
    S.apply_masks(plugin.layers, plugin.head_masks, plugin.ffn_masks)
    masked = logits(model, b)
    before = sum(p.numel() for p in model.parameters())
    plugin.finalize(model)
    after = sum(p.numel() for p in model.parameters())
    assert S.shape_summary(model)["heads"] == [2, 2]
    assert S.shape_summary(model)["ffn"] == [32, 32]
    assert after < before
    torch.testing.assert_close(logits(model, b), masked, atol=1e-5, rtol=0)


def test_masking_changes_output_and_slicing_keeps_most_important():
    model = tiny_bert()
    ref = logits(model, batch())
    layer = S.encoder_layers(model)[0]
    with torch.no_grad():  # make head 3 and FFN channel 5 clearly the largest in layer 0
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            lin.weight[24:32] *= 10
        layer.intermediate.dense.weight[5] *= 10
    plugin = PrunePlugin(PruneConfig(amount=0.75, taylor_weight=0.0))
    plugin.transform(model)
    plugin.update_masks(0.75, 0.75)
    assert plugin.head_masks[0].tolist() == [False, False, False, True]
    assert bool(plugin.ffn_masks[0][5])
    assert int(plugin.ffn_masks[0].sum()) == 16
    S.apply_masks(plugin.layers, plugin.head_masks, plugin.ffn_masks)
    assert not torch.allclose(logits(model, batch()), ref)


def test_taylor_importance_is_w_times_grad():
    model = tiny_bert()
    b = batch()
    _grads(model, b)
    layer = S.encoder_layers(model)[1]
    q, k, v, o = (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value,
                  layer.attention.output.dense)
    d = 8
    hand = torch.zeros(4)
    for h in range(4):
        r = slice(h * d, (h + 1) * d)
        for lin in (q, k, v):
            hand[h] += (lin.weight[r] * lin.weight.grad[r]).abs().sum() + (lin.bias[r] * lin.bias.grad[r]).abs().sum()
        hand[h] += (o.weight[:, r] * o.weight.grad[:, r]).abs().sum()
    torch.testing.assert_close(S.head_scores(layer, use_grad=True), hand)
    inter, out = layer.intermediate.dense, layer.output.dense
    hand_f = ((inter.weight * inter.weight.grad).abs().sum(1) + (inter.bias * inter.bias.grad).abs()
              + (out.weight * out.weight.grad).abs().sum(0))
    torch.testing.assert_close(S.ffn_scores(layer, use_grad=True), hand_f)
    hand_l1 = sum(lin.weight.abs().reshape(4, d, -1).sum((1, 2)) + lin.bias.abs().reshape(4, d).sum(1)
                  for lin in (q, k, v)) + o.weight.abs().reshape(-1, 4, d).sum((0, 2))
    torch.testing.assert_close(S.head_scores(layer), hand_l1)


def test_mixing_weight_changes_ranking():
    l1 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    taylor = torch.tensor([4.0, 3.0, 2.0, 1.0])
    alive = torch.ones(4, dtype=torch.bool)
    keep_l1 = S.choose_keep(S.mix_importance(l1, taylor, 0.0), alive, 2)
    keep_t = S.choose_keep(S.mix_importance(l1, taylor, 1.0), alive, 2)
    assert keep_l1.tolist() == [False, False, True, True]
    assert keep_t.tolist() == [True, True, False, False]
    mixed = S.mix_importance(l1, taylor, 0.25)
    torch.testing.assert_close(mixed, 0.75 * l1 / l1.mean() + 0.25 * taylor / taylor.mean())


def test_cubic_schedule_is_gradual_and_monotone():
    values = [cubic_schedule(s, 10, 110, 0.5) for s in range(0, 130, 5)]
    assert values[0] == 0.0 and values[-1] == 0.5
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert 0.0 < cubic_schedule(30, 10, 110, 0.5) < cubic_schedule(60, 10, 110, 0.5) < 0.5


def test_gradual_pruning_during_training_with_lightning(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from dsframe.task import ClassificationTask

    model = tiny_bert()
    data = [{k: v[i] for k, v in batch(n=64, seed=3).items()} for i in range(64)]
    loader = DataLoader(data, batch_size=4)
    plugin = PrunePlugin(PruneConfig(amount=0.5, every_n_steps=2, end_fraction=0.75, taylor_weight=0.5))
    plugin.transform(model)
    task = ClassificationTask(model, [plugin])
    trainer = pl.Trainer(max_steps=16, callbacks=[plugin], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, loader)
    kept = [h["heads_kept"] for h in plugin.history]
    assert len(plugin.history) >= 2, plugin.history  # several steps, not one shot
    assert kept == sorted(kept, reverse=True) and kept[-1] == 4
    assert all(float(t.sum()) > 0 for t in plugin.head_taylor)  # Taylor statistics were gathered
    b = batch()
    masked = logits(model, b)
    plugin.finalize(model)
    assert S.shape_summary(model)["heads"] == [2, 2]
    torch.testing.assert_close(logits(model, b), masked, atol=1e-5, rtol=0)


def test_pruned_model_saves_and_reloads(tmp_path):
    ensure_bert_registered()
    model = tiny_bert()
    plugin = PrunePlugin(PruneConfig(amount=0.5, head_amount=0.25))
    plugin.transform(model)
    plugin.finalize(model)
    path = save_model(model, tmp_path / "model.pt")
    again = load_model(path)
    assert again.arch()["heads"] == [3, 3] and again.arch()["ffn"] == [32, 32]
    b = batch()
    torch.testing.assert_close(logits(again, b), logits(model, b), atol=0, rtol=0)


def test_prune_then_more_pruning_of_a_pruned_model():
    model = tiny_bert()
    p1 = PrunePlugin(PruneConfig(amount=0.5))
    p1.transform(model)
    p1.finalize(model)
    p2 = PrunePlugin(PruneConfig(amount=0.5))
    p2.transform(copy.deepcopy(model))
    p2.transform(model)
    p2.finalize(model)
    assert S.shape_summary(model)["heads"] == [1, 1] and S.shape_summary(model)["ffn"] == [16, 16]


@pytest.mark.parametrize("amount", [1.5, 1.0, -0.1])
def test_amount_outside_range_is_refused(amount):
    with pytest.raises(ConfigError, match=r"plugins\.prune\.amount.*\[0, 1\)"):
        PruneConfig(amount=amount)


def test_prune_refuses_a_model_without_bert_layers():
    from dsframe.errors import DsframeError
    with pytest.raises(DsframeError, match="BERT-family"):
        PrunePlugin(PruneConfig()).transform(torch.nn.Linear(3, 2))


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(bad)


def test_drop_layers_removes_the_least_important_layer_and_reloads(tmp_path):
    ensure_bert_registered()
    model = tiny_bert(layers=3)
    b = batch(n=8)
    with torch.no_grad():  # make layer 1 an (almost) no-op: its Taylor score is then the smallest
        layer = S.encoder_layers(model)[1]
        layer.attention.output.dense.weight.mul_(1e-4)
        layer.output.dense.weight.mul_(1e-4)
    plugin = PrunePlugin(PruneConfig(amount=0.0, drop_layers=1))
    scores = plugin.layer_scores(model, [b])
    assert min(range(3), key=lambda i: scores[i]) == 1
    kept = plugin.drop_layers(model, [b])
    assert kept == [0, 2]
    assert len(S.encoder_layers(model)) == 2 and model.encoder.config.num_hidden_layers == 2
    assert all(p.grad is None for p in model.parameters())
    out = logits(model, b)
    again = load_model(save_model(model, tmp_path / "model.pt"))
    assert again.arch()["hf_config"]["num_hidden_layers"] == 2
    torch.testing.assert_close(logits(again, b), out, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="drop_layers"):
        PrunePlugin(PruneConfig(drop_layers=2)).drop_layers(model, [b])


@pytest.mark.slow
def test_prune_in_a_two_rank_stage_keeps_what_the_ranks_pruned(compose, tmp_path):
    """Ranks are forked: masks grow there; finalize (here) must slice exactly the zeroed heads."""
    import json

    from dsframe.config import validate
    from dsframe.runner import Runner

    cfg = compose("recipe=sentiment", "debug=tiny", "trainer.devices=2", "trainer.limit_train_batches=4",
                  "+recipe.stages.finetune.plugins=[prune]", "+plugins.prune.amount=0.5",
                  "+plugins.prune.every_n_steps=1", "+plugins.prune.end_fraction=0.5")
    Runner(validate(cfg), tmp_path).run()
    model = load_model(tmp_path / "finetune" / "model.pt")
    assert [S.num_heads(layer) for layer in S.encoder_layers(model)] == [2, 2]
    assert [S.ffn_width(layer) for layer in S.encoder_layers(model)] == [64, 64]
    assert all(bool((S.head_scores(layer) > 0).all()) for layer in S.encoder_layers(model))
    assert json.loads((tmp_path / "finetune" / "prune.json").read_text())["final"]
