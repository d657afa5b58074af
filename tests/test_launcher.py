"""Cluster launchers: the shipped submitit configs compose from the run's trainer settings; a
multi-process job under submitit takes its ranks from the launcher's environment (no forking),
and trains exactly as the same job with locally forked ranks."""
import json
import re

import pytest

from dsframe.launch import submitit_local_ranks
from tests.conftest import run_cli


def test_slurm_config_takes_its_task_layout_from_the_trainer():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import dsframe.cli  # noqa: F401  resolvers

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("dsframe.conf", version_base="1.3"):
            cfg = compose("config", overrides=["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2",
                                               "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"],
                          return_hydra_config=True)
            local = compose("config", overrides=["hydra/launcher=slurm_local", "trainer.devices=2"],
                            return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == ("gpu", 2, 4, 4)
    assert launcher.timeout_min == 240 and launcher.cpus_per_task == 2
    assert local.hydra.launcher._target_.endswith("LocalLauncher") and local.hydra.launcher.tasks_per_node == 2


def test_local_executor_ranks_become_torch_distributed_variables():
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
           "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
           "SUBMITIT_LOCAL_JOB_ID": "4242"}
    ranks = submitit_local_ranks(env)
    assert {k: ranks[k] for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")} == {
        "RANK": "1", "LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}
    other = submitit_local_ranks({**env, "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"})
    assert other["MASTER_PORT"] == ranks["MASTER_PORT"]  # every task of a job meets on one port
    assert submitit_local_ranks({**env, "SUBMITIT_LOCAL_NTASKS": "1"}) == {}
    assert submitit_local_ranks({**env, "LOCAL_RANK": "0"}) == {}  # a launcher set them already
    assert submitit_local_ranks({**env, "SUBMITIT_EXECUTOR": "slurm"}) == {}  # Lightning reads SLURM's own


def test_ddp_does_not_fork_ranks_that_slurm_started(monkeypatch):
    from dsframe.config.schema import TrainerConfig
    from dsframe.strategies import DDP, DDPConfig, ranks_started_externally

    for key in ("LOCAL_RANK", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    trainer = TrainerConfig(devices=2, accelerator="cpu")
    assert not ranks_started_externally() and DDP().build(DDPConfig(), trainer)._start_method == "fork"
    monkeypatch.setenv("SLURM_NTASKS", "2")  # srun started the tasks (the job name is not an interactive shell)
    monkeypatch.setenv("SLURM_JOB_NAME", "dsframe")
    assert ranks_started_externally() and DDP().build(DDPConfig(), trainer)._start_method == "popen"


@pytest.mark.slow
def test_two_rank_job_under_submitit_local_matches_forked_ranks(tmp_path, compose):
    from dsframe.config import validate
    from dsframe.runner import Runner

    args = ["recipe=sentiment", "debug=tiny", "strategy=ddp", "trainer.devices=2", "trainer.limit_train_batches=2"]
    proc = run_cli("-m", "hydra/launcher=slurm_local", *args, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = {p.name: p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.*")}
    ranks = sorted(m for text in logs.values() for m in re.findall(r"GLOBAL_RANK: (\d), MEMBER: \d/2", text))
    assert ranks == ["0", "1"]  # two submitit tasks, one rank each: nothing forked more
    # the same job with ranks forked by Lightning (here, from the test process)
    Runner(validate(compose(*args, "trainer.enable_progress_bar=false")), tmp_path / "forked").run()
    ours = json.loads((tmp_path / "sweep" / "0" / "finetune" / "metrics.json").read_text())
    forked = json.loads((tmp_path / "forked" / "finetune" / "metrics.json").read_text())
    assert ours["fit"] == forked["fit"] and ours["test"] == forked["test"]
