import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _rendezvous_left_as_found():
    """An in-process fit leaves MASTER_PORT in this process's environment (the runner and Lightning's
    launcher set it for the ranks they fork). A later test's command line would inherit it and take
    it for the user's: the two jobs of a parallel (joblib) sweep then both used that one port, and
    the second waited for the port retry. Every test ends with the environment it started with."""
    before = {k: os.environ.get(k) for k in RENDEZVOUS_VARS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real command line, ``python -m dsframe ARGS``, from ``cwd``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "dsframe", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def compose():
    """Compose the run config in-process, as the CLI would, without running it."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import dsframe.cli  # noqa: F401  registers the run-dir resolver

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_module("dsframe.conf", version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()
