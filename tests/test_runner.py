"""The recipe runner with a real (small, random) BERT and real data, in-process."""
import json
from dataclasses import dataclass

import pytest
import torch

from dsframe import Plugin, registry
from dsframe.config import validate
from dsframe.errors import CheckpointError, DsframeError
from dsframe.models.files import load_model
from dsframe.plugin import order_plugins
from dsframe.runner import Runner

TINY = ("recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=3")


@dataclass
class RecorderConfig:
    weight: float = 0.0


class Recorder(Plugin):
    """Records that every hook ran and adds ``weight * ||logits||²`` to the loss."""

    name = "recorder"
    description = "test plugin"
    Config = RecorderConfig
    calls: list = []

    def transform(self, model):
        Recorder.calls.append("transform")
        model.register_buffer("recorder_mark", torch.ones(1))
        return model

    def loss(self, task, batch, outputs, loss):
        Recorder.calls.append("loss")
        Recorder.last = (loss.detach().clone(), outputs.detach().pow(2).sum())
        return loss + self.config.weight * outputs.pow(2).sum()

    def on_train_end(self, trainer, pl_module):
        Recorder.calls.append("on_train_end")

    def finalize(self, model):
        Recorder.calls.append("finalize")
        assert model.recorder_mark.item() == 1.0  # the parent process sees what the stage trained
        del model.recorder_mark  # a saved model must be rebuildable from its arch alone
        model.classifier.bias.data.fill_(0.0)
        return model


@pytest.fixture
def recorder():
    registry.plugins.register("recorder", Recorder)
    Recorder.calls = []
    yield Recorder
    registry.plugins._extra.pop("recorder", None)


def test_stage_runs_plugin_hooks_and_writes_artifacts(compose, tmp_path, recorder):
    cfg = compose(*TINY, "+recipe.stages.finetune.plugins=[recorder]", "+plugins.recorder.weight=0.5")
    results = Runner(validate(cfg), tmp_path).run()
    calls = Recorder.calls
    assert calls[0] == "transform" and calls[-1] == "finalize"
    assert calls.count("loss") == 3 and "on_train_end" in calls
    stage = tmp_path / "finetune"
    for name in ("model.pt", "metrics.json", "stage.json", "checkpoints/last.ckpt", "curves.png"):
        assert (stage / name).exists(), name
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics == results["finetune"]
    assert 0.0 <= metrics["test"]["test/acc"] <= 1.0
    model = load_model(stage / "model.pt")
    assert torch.equal(model.classifier.bias, torch.zeros_like(model.classifier.bias))  # finalize was saved
    assert "recorder_mark" not in model.state_dict()


def test_rerun_skips_finished_stage(compose, tmp_path, recorder):
    cfg = compose(*TINY)
    Runner(validate(cfg), tmp_path).run()
    before = (tmp_path / "finetune" / "model.pt").stat().st_mtime_ns
    results = Runner(validate(cfg), tmp_path).run()
    assert (tmp_path / "finetune" / "model.pt").stat().st_mtime_ns == before
    assert "test" in results["finetune"]


def test_unfinished_stage_resumes_from_last_checkpoint(compose, tmp_path, recorder):
    with_recorder = (*TINY, "+recipe.stages.finetune.plugins=[recorder]")
    Runner(validate(compose(*with_recorder, "trainer.max_epochs=1")), tmp_path).run()
    # as if killed after epoch 1 of 2: the checkpoint is there, the stage is not done
    (tmp_path / "finetune" / "stage.json").unlink()
    ckpt = torch.load(tmp_path / "finetune" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    Recorder.calls = []
    Runner(validate(compose(*with_recorder, "trainer.max_epochs=2")), tmp_path).run()
    assert Recorder.calls.count("loss") == 3  # only the second epoch ran
    ckpt = torch.load(tmp_path / "finetune" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6


def test_corrupt_checkpoint_is_a_clear_error_and_keeps_files(compose, tmp_path):
    cfg = compose(*TINY)
    Runner(validate(cfg), tmp_path).run()
    (tmp_path / "finetune" / "stage.json").unlink()
    last = tmp_path / "finetune" / "checkpoints" / "last.ckpt"
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        Runner(validate(cfg), tmp_path).run()
    assert last.read_bytes() == b"not a checkpoint"
    assert (tmp_path / "finetune" / "model.pt").exists()


def test_two_stage_recipe_hands_model_to_next_stage(compose, tmp_path):
    cfg = compose(*TINY, "+recipe.stages.second.init_from=finetune", "+recipe.stages.second.trainer.max_steps=1")
    results = Runner(validate(cfg), tmp_path).run()
    assert list(results) == ["finetune", "second"]
    first = load_model(tmp_path / "finetune" / "model.pt").state_dict()
    ckpt = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 1
    # the second stage started from the first stage's weights, then took one optimizer step
    w = "model.encoder.embeddings.word_embeddings.weight"
    assert ckpt["state_dict"][w].shape == first[w[len("model."):]].shape


class A(Plugin):
    name = "a"


class B(Plugin):
    name = "b"
    runs_after = ("a",)


class C(Plugin):
    name = "c"
    conflicts_with = ("a",)


def test_plugins_order_by_declared_dependencies_not_config_order():
    assert [p.name for p in order_plugins([B(), A()])] == ["a", "b"]
    assert [p.name for p in order_plugins([A(), B()])] == ["a", "b"]


def test_conflicting_plugins_fail_with_both_names():
    with pytest.raises(DsframeError, match="'c' cannot run in the same stage as a"):
        order_plugins([A(), C()])
