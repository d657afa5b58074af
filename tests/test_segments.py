"""Segments of a fit stage: a plugin ends the running Trainer and the runner continues the stage
with other trainer settings from the checkpoint taken at the switch. Checked against an
uninterrupted run of the same recipe: the same global steps, the same LR at every step, every
training sample seen exactly once per epoch, the same total of samples; and the resizable batch
sampler on its own (mid-epoch resize, position through a state dict, other rank counts)."""
import json
from collections import Counter

import pytest
import torch

from dsframe import Plugin, registry
from dsframe.config import validate
from dsframe.data.loaders import EpochSampler, ResizableBatchSampler
from dsframe.runner import Runner

# 128 samples, batch 16: 8 steps an epoch, 2 epochs
TINY = ("recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=1.0", "trainer.max_epochs=2",
        "trainer.limit_val_batches=1", "++recipe.stages.finetune.test=false")


class Switcher(Plugin):
    """Records every training batch (rank, step, precision, ranks, LR, the rows) and ends the
    segment at the global steps of ``plan`` with the trainer changes given there."""

    name = "switcher"
    plan: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rows = [[t for t in row if t != 0] for row in batch["input_ids"].tolist()]
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "precision": trainer.precision,
                  "world": trainer.world_size, "lr": trainer.optimizers[0].param_groups[0]["lr"], "rows": rows}
        with open(self.context.stage_dir / f"seen-{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        change = self.plan.get(trainer.global_step)
        if change:
            self.context.end_segment(trainer, reason="test", **change)


@pytest.fixture
def switcher():
    registry.plugins.register("switcher", Switcher)
    yield Switcher
    registry.plugins._extra.pop("switcher", None)


def _records(stage_dir):
    out = []
    for path in sorted(stage_dir.glob("seen-*.jsonl")):
        out += [json.loads(line) | {"rank": int(path.stem.split("-")[1])} for line in path.read_text().splitlines()]
    return out


def _run(compose, tmp_path, plan):
    Switcher.plan = plan
    cfg = compose(*TINY, "+recipe.stages.finetune.plugins=[switcher]")
    Runner(validate(cfg), tmp_path).run()
    stage = tmp_path / "finetune"
    ckpt = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return stage, _records(stage), ckpt


@pytest.mark.slow
def test_three_segments_continue_one_uninterrupted_run(compose, tmp_path, switcher):
    _, ref, ref_ckpt = _run(compose, tmp_path / "ref", {})
    # mid-epoch, at the last batch of epoch 0 (the switch waits for the epoch's end), mid-epoch
    plan = {3: {"precision": "bf16-mixed", "devices": 2}, 8: {"precision": "32-true"}, 11: {"devices": 1}}
    stage, seg, ckpt = _run(compose, tmp_path / "seg", plan)

    ledger = json.loads((stage / "segments.json").read_text())
    assert [(s["start_step"], s["trainer"]) for s in ledger] == [
        (3, plan[3]), (8, {"precision": "32-true", "devices": 2}), (11, {"precision": "32-true", "devices": 1})]
    rank0 = [r for r in seg if r["rank"] == 0]
    assert [r["step"] for r in rank0] == list(range(16)) == [r["step"] for r in ref]  # continuous, none twice
    setting = {r["step"]: (r["precision"], r["world"]) for r in rank0}
    assert setting[2] == ("32-true", 1) and setting[3] == setting[7] == ("bf16-mixed", 2)
    assert setting[8] == setting[10] == ("32-true", 2) and setting[11] == setting[15] == ("32-true", 1)
    # the LR schedule continues exactly (same global batch on 1 or 2 ranks)
    ref_lr = {r["step"]: r["lr"] for r in ref}
    for r in rank0:
        assert r["lr"] == pytest.approx(ref_lr[r["step"]], rel=1e-9), r["step"]
    # every sample once per epoch, over the ranks and the segments, exactly as without segments
    for epoch in (0, 1):
        seen = Counter(tuple(row) for r in seg if r["epoch"] == epoch for row in r["rows"])
        expected = Counter(tuple(row) for r in ref if r["epoch"] == epoch for row in r["rows"])
        assert seen == expected and sum(seen.values()) == 128
    assert ckpt["global_step"] == ref_ckpt["global_step"] == 16
    assert ckpt["dsframe_progress"]["samples_seen"] == ref_ckpt["dsframe_progress"]["samples_seen"] == 256
    assert (stage / "model.pt").exists() and (stage / "logs" / "fit-3" / "metrics.csv").exists()


def test_end_segment_refuses_a_setting_it_cannot_change(tmp_path):
    from dsframe.errors import ConfigError
    from dsframe.plugin import StageContext

    ctx = StageContext(run_dir=tmp_path, stage_name="s", cfg=None)
    with pytest.raises(ConfigError, match="max_epochs"):
        ctx.end_segment(trainer=None, max_epochs=3)


def _epoch(sampler, epoch, consume=None):
    """Iterate one epoch as a training loop would: mark each batch consumed as it starts."""
    sampler.sampler.set_epoch(epoch)
    out = []
    for i, batch in enumerate(sampler, start=sampler.batches):
        sampler.mark_consumed(i)
        out.append(batch)
        if consume is not None and len(out) == consume:
            break
    return out


def test_batch_size_changes_mid_epoch_and_position_survives_a_state_dict():
    s = ResizableBatchSampler(EpochSampler(50), 4, seed=1)
    first = _epoch(s, 0, consume=3)
    s.set_batch_size(10)
    state = s.state_dict()
    assert state["offset"] == 12 and state["global_batch_size"] == 10
    t = ResizableBatchSampler(EpochSampler(50), 4, seed=1)
    t.load_state_dict(state)
    assert len(t) == 3 + 4  # 3 batches done, 38 samples left in batches of 10
    rest = _epoch(t, 0)
    assert [len(b) for b in rest] == [10, 10, 10, 8]
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1)).tolist()
    assert sum(first + rest, []) == order  # nothing twice, nothing skipped, the same order
    assert sum(_epoch(t, 1), []) == torch.randperm(50, generator=torch.Generator().manual_seed(2)).tolist()


class _Dist:
    """What Lightning's DistributedSampler exposes to the batch sampler."""

    def __init__(self, n, rank, world):
        self.dataset, self.rank, self.num_replicas, self.epoch = range(n), rank, world, 0

    def set_epoch(self, epoch):
        self.epoch = epoch


def test_a_change_of_rank_count_keeps_the_global_order_and_batch():
    one = ResizableBatchSampler(EpochSampler(30), 6, seed=0)
    head = _epoch(one, 0, consume=2)
    state = one.state_dict()
    ranks = [ResizableBatchSampler(_Dist(30, r, 2), 6, seed=0) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
        assert r.batch_size == 3 and len(r) == 2 + 3
    tails = [_epoch(r, 0) for r in ranks]
    merged = sum((a + b for a, b in zip(*tails)), [])
    assert sum(head, []) + merged == torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()
