"""The real command line, end to end: runs, errors, multi-process runs and sweeps."""
import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import run_cli

TINY = ("recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=2")


def _run_dirs(root):
    return sorted(p.parent for p in root.rglob("config.yaml") if (p.parent / ".hydra").is_dir())


@pytest.mark.slow
def test_first_recipe_runs_end_to_end_and_rerun_skips(tmp_path):
    proc = run_cli(*TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_dir] = _run_dirs(tmp_path / "outputs")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["finetune"]["test"]) >= {"test/acc", "test/f1", "test/loss"}
    assert (run_dir / "finetune" / "model.pt").stat().st_size > 0
    assert (run_dir / "finetune" / "logs" / "fit" / "metrics.csv").exists()

    again = run_cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finetune: already done, skipping" in again.stdout + again.stderr


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1 is not allowed: an integer >= 1"),
    ("+recipe.stages.finetune.plugins=[nope]", "recipe.stages.finetune.plugins='nope' is not allowed: one of"),
    ("model.name_or_path=no-such-org/no-such-model", "model.name_or_path='no-such-org/no-such-model'"),
])
def test_bad_config_is_one_line_no_traceback(tmp_path, override, expected):
    proc = run_cli("recipe=sentiment", "debug=tiny", override, cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("model.pt"))  # nothing trained


@pytest.mark.parametrize("mode", [(), ("-m",)], ids=["run", "multirun"])
def test_unknown_key_names_the_allowed_keys(tmp_path, mode):
    proc = run_cli(*mode, "recipe=sentiment", "trainer.max_epoch=3", cwd=tmp_path)
    assert proc.returncode == 1
    assert "trainer.max_epoch is not a key of 'trainer'" in proc.stderr
    assert "max_epochs" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_lists_groups_and_options(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for group in ("recipe:", "model:", "data:", "trainer:", "strategy:", "debug:", "optim:"):
        assert group in proc.stdout
    assert "sentiment" in proc.stdout


def test_two_runs_started_together_get_different_directories(tmp_path):
    cmd = [sys.executable, "-m", "dsframe", "recipe=sentiment", "--cfg", "all", "--resolve"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    dirs = [[line.strip() for line in out.splitlines() if "dir: outputs/sentiment/" in line] for out in outputs]
    assert all(len(d) == 1 for d in dirs), outputs
    assert dirs[0] != dirs[1]


@pytest.mark.slow
def test_two_process_run_writes_one_run_directory(tmp_path):
    # the port the ranks are told to meet on is taken (as when another process binds it between its
    # choice and rank 0's listen): the ranks start again on another port instead of failing the stage
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(*TINY, "trainer.devices=2", cwd=tmp_path, env={"MASTER_PORT": str(port)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"port {port} was taken before the ranks met on it" in proc.stdout + proc.stderr
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    [run_dir] = _run_dirs(tmp_path / "outputs")
    assert (run_dir / "finetune" / "stage.json").exists()
    assert sorted(p.name for p in (tmp_path / "outputs" / "sentiment").iterdir()) == [run_dir.name]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [
    ("seed=1,2",),
    ("seed=1,2", "trainer.devices=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
], ids=["basic", "joblib-2proc-jobs"])
def test_multirun_runs_each_job_exactly_once(tmp_path, launcher):
    proc = run_cli("-m", *TINY, *launcher, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "multirun" / "sentiment").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    seeds = set()
    for job in jobs:
        log = (job / "cli.log").read_text()
        assert log.count("stage finetune: fine-tune") == 1  # ran once, in its own directory
        assert (job / "finetune" / "stage.json").exists()
        seeds.add((job / "config.yaml").read_text().split("seed: ")[1].split()[0])
    assert seeds == {"1", "2"}
    assert not (tmp_path / "outputs").exists()  # no child re-ran the command as a single run
