"""A plain (non-editable) wheel carries the configs and runs from any directory."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_configs_and_runs_outside_the_checkout(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    [wheel] = (tmp_path / "dist").glob("dsframe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("dsframe/conf/config.yaml", "dsframe/conf/recipe/sentiment.yaml",
                     "dsframe/conf/trainer/default.yaml", "dsframe/conf/hydra/help/dsframe.yaml"):
        assert required in names, required
    assert not any(n.startswith(("plugins/", "recipes/", "conf/")) for n in names)  # no clashing top-level packages
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import dsframe, sys; print(dsframe.__file__); "
                           "sys.argv=['dsframe','--help']; from dsframe.cli import main; main()"],
                          cwd=elsewhere, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(target))
    assert "recipe: " in proc.stdout and "sentiment" in proc.stdout
