"""Bad input ends in one line that names the problem: config values, data files, checkpoints."""
import pytest
import torch

from dsframe.config import validate
from dsframe.errors import CheckpointError, ConfigError, DsframeError
from dsframe.runner import Runner

TINY = ("recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=3")


@pytest.mark.parametrize("override, key", [
    ("threads=abc", "threads"),
    ("threads=1.5", "threads"),
    ("threads=0", "threads"),
    ("threads=true", "threads"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("trainer.val_check_interval=0.0", "trainer.val_check_interval"),
])
def test_bad_value_is_a_config_error(compose, override, key):
    with pytest.raises(ConfigError) as info:
        validate(compose(override))
    assert info.value.key == key


def test_good_threads_and_interval_pass(compose):
    spec = validate(compose("threads=2", "trainer.val_check_interval=0.5"))
    assert spec.threads == 2 and spec.trainer.val_check_interval == 0.5


@pytest.mark.parametrize("content, says", [
    (b"", "0 rated sentences"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not a UTF-8 text file"),
    (b"1\tgood\ta sentence\n", "expected 'id<TAB>rating<TAB>sentence'"),
    (b"1\t2.5\tonly positive\n2\t1.0\talso positive\n", "1 class"),
])
def test_bad_data_file_is_one_clear_error(compose, tmp_path, content, says):
    from dsframe.data.movie_reviews import read_ratings

    path = tmp_path / "ratings.txt"
    path.write_bytes(content)
    with pytest.raises(DsframeError, match=says) as info:
        read_ratings(path)
    assert str(path) in str(info.value)


@pytest.fixture
def finished_tiny_run(compose, tmp_path):
    cfg = compose(*TINY)
    Runner(validate(cfg), tmp_path).run()
    (tmp_path / "finetune" / "stage.json").unlink()  # the rerun resumes the stage from last.ckpt
    return tmp_path


def test_checkpoint_of_differently_shaped_model_is_named(compose, finished_tiny_run):
    run_dir = finished_tiny_run
    last = run_dir / "finetune" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    wider = compose(*TINY, "model.hf_config.intermediate_size=256")
    with pytest.raises(CheckpointError) as info:
        Runner(validate(wider), run_dir).run()
    msg = str(info.value)
    assert "differently shaped model" in msg and "intermediate" in msg and "[256, 64]" in msg
    assert "\n" not in msg
    assert last.read_bytes() == before  # the good checkpoint is kept
    assert (run_dir / "finetune" / "model.pt").exists()


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "no_state_dict"])
def test_damaged_checkpoint_is_named(compose, finished_tiny_run, damage):
    last = finished_tiny_run / "finetune" / "checkpoints" / "last.ckpt"
    if damage == "zero_bytes":
        last.write_bytes(b"")
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    else:
        torch.save({"epoch": 1}, last)
    with pytest.raises(CheckpointError, match="damaged or not a Lightning checkpoint"):
        Runner(validate(compose(*TINY)), finished_tiny_run).run()


def test_distributed_checkpoint_folder_is_read_as_one(tmp_path):
    """A DCP folder (what strategy=hybrid writes) is checked through its metadata, not torch.load."""
    import torch.distributed.checkpoint as dcp

    from dsframe.runner import _check_checkpoint

    task = torch.nn.Sequential(torch.nn.Linear(4, 3))
    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": task.state_dict()}, checkpoint_id=str(folder))
    torch.save({"epoch": 0, "global_step": 3}, folder / "meta.pt")
    _check_checkpoint(folder, "train", task)  # a valid folder passes
    with pytest.raises(CheckpointError, match=r"0.weight is \[3, 4\] there but \[5, 4\]"):
        _check_checkpoint(folder, "train", torch.nn.Sequential(torch.nn.Linear(4, 5)))
    (folder / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="damaged"):
        _check_checkpoint(folder, "train", task)


def test_init_from_another_architecture_is_named(compose, tmp_path):
    from dsframe.models.files import save_model
    from dsframe.models.gpt import GPT, GPTConfig

    cfg = compose(*TINY, "+recipe.stages.second.init_from=finetune")
    (tmp_path / "finetune").mkdir()
    save_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)),
               tmp_path / "finetune" / "model.pt")
    (tmp_path / "finetune" / "stage.json").write_text('{"status": "done"}')
    with pytest.raises(CheckpointError, match="holds a 'gpt' model, expected 'bert'"):
        Runner(validate(cfg), tmp_path).run()


@pytest.mark.parametrize("override, key", [
    ("+model.hf_config.num_attention_heads=5", "model.hf_config.num_attention_heads"),
    ("+model.hf_config.hidden_size=100", "model.hf_config.hidden_size"),
    ("+model.hf_config.num_hidden_layers=0", "model.hf_config.num_hidden_layers"),
])
def test_model_shape_is_checked_before_building(compose, override, key):
    with pytest.raises(ConfigError) as info:
        validate(compose("recipe=sentiment", override))
    assert info.value.key == key


@pytest.mark.slow
def test_cli_config_error_leaves_no_run_directory(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("recipe=sentiment", "threads=abc", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["dsframe: error: threads='abc' is not allowed: "
                                                "null (torch's default) or an integer >= 1"]
    assert not (tmp_path / "outputs").exists()
    # a rerun into an existing run directory keeps it, whatever the error
    run_dir = tmp_path / "earlier"
    (run_dir / "finetune").mkdir(parents=True)
    proc = run_cli("recipe=sentiment", "threads=abc", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 1 and (run_dir / "finetune").is_dir()


def test_an_override_under_a_missing_key_names_the_first_missing_one():
    from dsframe.precheck import unknown_key_message

    message = unknown_key_message(["recipe=sentiment", "model.hf_config.num_attention_heads=5"])
    assert message.startswith("model.hf_config is not a key of 'model'") and "+model.hf_config." in message
