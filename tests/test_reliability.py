"""Checkpoints during a stage, the NaN/Inf loss policy, a full disk, damaged checkpoints and
untrusted files, each injected into a real (tiny) run in this process."""
import errno
import pickle
import shutil

import pytest
import torch

from dsframe import faultinject, registry
from dsframe.config import validate
from dsframe.errors import CheckpointError, ConfigError, DsframeError
from dsframe.io import write_text
from dsframe.runner import Runner

# 128 samples, batch 16: 8 steps an epoch
TINY = ("recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1",
        "++recipe.stages.finetune.test=false", "checkpoint.every_n_steps=2")


@pytest.fixture
def faults(monkeypatch):
    for name, cls in faultinject.ENTRY_POINTS.items():
        registry.plugins.register(name, getattr(faultinject, cls))
    monkeypatch.setattr(torch, "save", torch.save)  # the disk-full fault replaces it
    yield
    for name in faultinject.ENTRY_POINTS:
        registry.plugins._extra.pop(name, None)


def _run(compose, run_dir, *overrides):
    return Runner(validate(compose(*TINY, *overrides)), run_dir).run()


def _ckpts(stage):
    return sorted(p.name for p in (stage / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (8 steps, a checkpoint every 2, the last 2 kept), copied by each test."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("dsframe.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(TINY))
    GlobalHydra.instance().clear()
    run = tmp_path_factory.mktemp("finished")
    Runner(validate(cfg), run).run()
    return run


def test_interval_checkpoints_are_atomic_and_only_the_last_n_are_kept(finished):
    assert _ckpts(finished / "finetune") == ["last.ckpt", "step-00000006.ckpt", "step-00000008.ckpt"]
    ckpt = torch.load(finished / "finetune/checkpoints/step-00000006.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["dsframe_progress"]["samples_seen"] == 6 * 16


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(compose, tmp_path, faults):
    with pytest.raises(DsframeError, match=r"loss is nan at step 5; stopped before updating the weights\. "
                                           r"Last good checkpoint: .*step-00000004\.ckpt"):
        _run(compose, tmp_path, "+recipe.stages.finetune.plugins=[fault_nan]", "+plugins.fault_nan.at_step=5")
    stage = tmp_path / "finetune"
    assert not (stage / "stage.json").exists() and not (stage / "model.pt").exists()
    assert _ckpts(stage) == ["step-00000002.ckpt", "step-00000004.ckpt"]
    sd = torch.load(stage / "checkpoints/step-00000004.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_skip_policy_drops_the_bad_batches_update_up_to_its_limit(compose, tmp_path, faults):
    nan = ("+recipe.stages.finetune.plugins=[fault_nan]", "+plugins.fault_nan.at_step=3", "nonfinite_loss.policy=skip")
    _run(compose, tmp_path / "ok", *nan, "+plugins.fault_nan.count=2", "nonfinite_loss.max_skips=2")
    stage = tmp_path / "ok" / "finetune"
    sd = torch.load(stage / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert torch.load(stage / "checkpoints/last.ckpt", weights_only=True)["dsframe_skipped_batches"] == 2
    with pytest.raises(DsframeError, match=r"at step 5 after 2 skipped batches \(nonfinite_loss.max_skips=2\)"):
        _run(compose, tmp_path / "over", *nan, "+plugins.fault_nan.count=3", "nonfinite_loss.max_skips=2")


def test_a_skipped_batch_leaves_the_weights_alone(compose, tmp_path, faults):
    """The step after the NaN batch starts from the weights the step before it ended with."""
    nan = ("+recipe.stages.finetune.plugins=[fault_nan]", "+plugins.fault_nan.at_step=2", "nonfinite_loss.policy=skip",
           "trainer.max_steps=3", "checkpoint.every_n_steps=1", "checkpoint.keep_last=5")
    _run(compose, tmp_path, *nan)
    ck = {s: torch.load(tmp_path / f"finetune/checkpoints/step-0000000{s}.ckpt", weights_only=True)["state_dict"]
          for s in (2, 3)}
    assert all(torch.equal(ck[2][k], ck[3][k]) for k in ck[2])


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(compose, tmp_path, faults):
    with pytest.raises(DsframeError, match=r"cannot write checkpoint .*step-00000004\.ckpt: the disk is full; "
                                           r"nothing was replaced, the last good checkpoint is .*step-00000002"):
        _run(compose, tmp_path, "+recipe.stages.finetune.plugins=[fault_disk_full]", "+plugins.fault_disk_full.at_step=3")
    stage = tmp_path / "finetune"
    assert _ckpts(stage) == ["step-00000002.ckpt"]  # no half-written file under any name
    assert torch.load(stage / "checkpoints/step-00000002.ckpt", weights_only=True)["global_step"] == 2


def test_disk_full_while_writing_an_artifact_keeps_the_previous_one(tmp_path):
    path = write_text(tmp_path / "report.md", "old report")

    def full(tmp):
        with open(tmp, "w") as f:
            f.write("half a rep")
        raise OSError(errno.ENOSPC, "No space left on device")

    from dsframe.io import atomic_write

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, full)
    assert path.read_text() == "old report" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage"])
def test_damaged_newest_checkpoint_is_named_and_the_earlier_one_kept(compose, finished, tmp_path, damage):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    stage = tmp_path / "finetune"
    (stage / "stage.json").unlink()  # as if killed right after writing step 8
    (stage / "checkpoints/last.ckpt").unlink()
    newest = stage / "checkpoints/step-00000008.ckpt"
    data = newest.read_bytes()
    newest.write_bytes({"truncate": data[: len(data) // 2], "zero": b"", "garbage": b"\x00garbage" * 99}[damage])
    with pytest.raises(CheckpointError, match=r"from .*step-00000008\.ckpt: the file is damaged .* Delete it to "
                                              r"resume from step-00000006\.ckpt instead"):
        _run(compose, tmp_path)
    assert torch.load(stage / "checkpoints/step-00000006.ckpt", weights_only=True)["global_step"] == 6
    if damage == "truncate":
        newest.unlink()
        _run(compose, tmp_path)  # resumes from step 6
        assert torch.load(stage / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 8


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(compose, tmp_path, capsys):
    stage = tmp_path / "finetune" / "checkpoints"
    stage.mkdir(parents=True)
    with open(stage / "last.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "x": _Payload()}, f)
    with pytest.raises(CheckpointError, match="damaged or not a Lightning checkpoint"):
        _run(compose, tmp_path)
    assert "code ran" not in capsys.readouterr().out  # loaded with weights_only=True


@pytest.mark.parametrize("override, key", [
    ("+model._target_=os.system", "model._target_"),
    ("+plugins.prune._target_=os.system", "plugins.prune._target_"),
    ("model.kind=os.system", "model.kind"),
    ("+recipe.stages.finetune.plugins=[builtins.eval]", "recipe.stages.finetune.plugins"),
])
def test_names_resolve_only_through_the_registries(compose, override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose("recipe=sentiment", override))
    assert err.value.key == key


@pytest.mark.parametrize("override, key", [
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps"),
    ("checkpoint.every_minutes=-1", "checkpoint.every_minutes"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("nonfinite_loss.policy=ignore", "nonfinite_loss.policy"),
    ("+recipe.stages.finetune.options.x=1", "recipe.stages.finetune.options"),
])
def test_fault_policy_values_are_checked(compose, override, key):
    with pytest.raises(ConfigError) as err:
        validate(compose("recipe=sentiment", override))
    assert err.value.key == key


def test_a_typo_in_the_last_stages_options_fails_at_config_time(compose):
    with pytest.raises(ConfigError) as err:
        validate(compose("recipe=bert_compress", "+recipe.stages.evaluate.options.latency_repeat=3"))
    assert err.value.key == "recipe.stages.evaluate.options.latency_repeat"


def test_eval_batch_is_checked_against_pipeline_micro_batches_before_building(compose):
    with pytest.raises(ConfigError) as err:
        validate(compose("recipe=lm_hybrid_parallel", "data.eval_batch_size=30"))
    assert err.value.key == "data.eval_batch_size" and "micro_batches=4" in err.value.allowed


def test_time_interval_checkpoints(compose, tmp_path):
    """every_minutes alone: with an interval shorter than a step, every step is checkpointed."""
    _run(compose, tmp_path, "trainer.max_steps=3", "checkpoint.every_n_steps=null", "checkpoint.every_minutes=1e-6")
    assert _ckpts(tmp_path / "finetune") == ["last.ckpt", "step-00000002.ckpt", "step-00000003.ckpt"]
