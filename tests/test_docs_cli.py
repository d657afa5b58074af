"""What a person notices at the command line: a config error does not wait for torch/Lightning,
printing commands end quietly in a closed pipe, artifacts get the user's umask."""
import os
import stat
import subprocess
import sys

from tests.conftest import REPO


def _imported_modules(*args, cwd):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dsframe", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, modules


def test_config_error_imports_neither_torch_nor_lightning(tmp_path):
    for override, key in (("optim.lr=-1", "optim.lr=-1.0"), ("trainer.devices=0", "trainer.devices=0"),
                          ("recipe.task=foo", "recipe.task='foo'")):
        proc, modules = _imported_modules(override, cwd=tmp_path)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
        assert errors == [f"dsframe: error: {errors[0].split('error: ')[1]}"] and key in errors[0]
        assert "torch" not in modules and "lightning" not in modules, override
    assert not (tmp_path / "outputs").exists()  # and it leaves no run directory


def test_task_kinds_of_the_config_match_the_task_classes():
    from dsframe.optim import TASK_KINDS
    from dsframe.task import TASKS

    assert set(TASK_KINDS) == set(TASKS)


def test_help_into_a_closed_pipe_ends_quietly(tmp_path):
    proc = subprocess.run(f"'{sys.executable}' -m dsframe --help | true", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, executable="/bin/bash")
    assert "BrokenPipeError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_artifacts_follow_the_umask(tmp_path):
    code = ("import os; os.umask(0o027); from dsframe.io import write_json; "
            f"write_json({str(tmp_path / 'a.json')!r}, {{'x': 1}})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640  # not mkstemp's 0600
