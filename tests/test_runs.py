"""Run records (run.json) and ``python -m dsframe runs``."""
import csv
import json
import struct
import subprocess

import pytest

from dsframe.records import build_record, find_runs, format_runs, run_row, stage_seconds
from tests.conftest import REPO, run_cli


def _fake_run(root, name, recipe, metrics, started=None):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / "config.yaml").write_text(f"recipe:\n  name: {recipe}\n")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
        for stage, m in metrics.items():
            (d / stage).mkdir()
            (d / stage / "metrics.json").write_text(json.dumps(m))
    return d


def test_record_holds_versions_git_machine_and_stage_times(tmp_path):
    run = _fake_run(tmp_path, "r", "sentiment", {"a": {"seconds": 1.5}, "b": {"seconds": 2.25, "test": {"test/acc": 0.7}}})
    record = build_record(run, "done", started=0.0, overrides=["recipe=sentiment"])
    assert record["recipe"] == "sentiment" and record["status"] == "done" and record["overrides"] == ["recipe=sentiment"]
    assert record["stages"] == {"a": 1.5, "b": 2.25} == stage_seconds(run)
    assert {"dsframe", "torch", "lightning", "hydra-core"} <= set(record["versions"])
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["git"]["commit"] == head  # the checkout dsframe is imported from
    assert record["machine"]["cpu_model"] and "cpu_flags" in record["machine"]
    assert record["metrics"]["b"]["test"]["test/acc"] == 0.7


def test_runs_lists_newest_first_with_status_and_figures(tmp_path):
    old = _fake_run(tmp_path / "outputs", "old", "sentiment", {"finetune": {"test": {"test/acc": 0.61}, "seconds": 3}})
    (old / "run.json").write_text(json.dumps({"recipe": "sentiment", "status": "done", "started": "2026-01-01T10:00:00+00:00",
                                              "wall_seconds": 12.0, "metrics": {"finetune": {"test": {"test/acc": 0.61}}}}))
    new = _fake_run(tmp_path / "outputs", "new", "bert_compress", None)
    (new / "run.json").write_text(json.dumps({"recipe": "bert_compress", "status": "failed",
                                              "started": "2026-02-01T10:00:00+00:00", "error": "teacher missing"}))
    _fake_run(tmp_path / "outputs", "killed", "sentiment", None)  # no run.json: killed, or still running
    assert len(find_runs([tmp_path / "outputs"])) == 3
    rows = [run_row(d) for d in find_runs([tmp_path / "outputs"])]
    text = format_runs(rows)
    lines = text.splitlines()
    assert "killed" in lines[1] and "incomplete" in lines[1]  # its config.yaml is from today: newest
    assert "bert_compress" in lines[2] and "failed" in lines[2] and "error: teacher missing" in lines[2]
    assert "sentiment" in lines[3] and "done" in lines[3] and "test/acc=0.61" in lines[3] and "12s" in lines[3]


@pytest.mark.slow
def test_real_runs_leave_records_and_are_listed(tmp_path, compose):
    # fails after it started (the teacher file is missing): run.json says failed, from the exit hook
    failed = run_cli("recipe=sentiment", "debug=tiny", "recipe.stages.finetune.plugins=[distill]",
                     "plugins.distill.teacher=missing/teacher.pt", cwd=tmp_path)
    assert failed.returncode == 1 and "teacher" in failed.stderr
    bad = run_cli("recipe=sentiment", "optim.lr=-1", cwd=tmp_path)  # a config error leaves no directory
    assert bad.returncode == 1
    [run] = find_runs([tmp_path / "outputs"])
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and record["recipe"] == "sentiment" and record["versions"]["dsframe"]

    # logger=tensorboard: event files beside the CSV logs, holding the same training losses
    from dsframe.config import validate
    from dsframe.runner import Runner

    (tmp_path / "outputs" / "tb" / ".hydra").mkdir(parents=True)
    Runner(validate(compose("recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=2", "logger=tensorboard")),
           tmp_path / "outputs" / "tb").run()
    stage = tmp_path / "outputs" / "tb" / "finetune"
    [events] = (stage / "logs" / "tensorboard" / "fit").glob("events.out.tfevents.*")
    csv_losses = [float(r["train/loss"]) for r in csv.DictReader(open(stage / "logs" / "fit" / "metrics.csv"))
                  if r.get("train/loss")]
    assert _scalars(events, "train/loss") == pytest.approx(csv_losses, abs=1e-6) and len(csv_losses) == 2

    # logger=mlflow: one MLflow run per fit segment in the run directory's SQLite store, same losses
    import mlflow

    (tmp_path / "outputs" / "ml" / ".hydra").mkdir(parents=True)
    Runner(validate(compose("recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=2", "logger=mlflow")),
           tmp_path / "outputs" / "ml").run()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'ml' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("sentiment").experiment_id])
    assert run.data.tags["mlflow.runName"] == "finetune/fit" and run.info.status == "FINISHED"
    ml_losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    csv_losses = [float(r["train/loss"]) for r in csv.DictReader(open(tmp_path / "outputs" / "ml" / "finetune" / "logs"
                                                                       / "fit" / "metrics.csv")) if r.get("train/loss")]
    assert ml_losses == pytest.approx(csv_losses, abs=1e-6) and len(ml_losses) == 2

    listed = run_cli("runs", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 4 and all(" done " in x and "test/acc=" in x for x in lines[1:3]) and " failed " in lines[3]
    missing = run_cli("runs", "nowhere", cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.strip() == "dsframe: error: no such directory: nowhere"


def _scalars(path, tag):
    """Values of ``tag`` in a TensorBoard event file (TFRecord frames of Event protos)."""
    from tensorboardX.proto import event_pb2

    values, data = [], path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        values += [v.simple_value for v in event.summary.value if v.tag == tag]
    return values


def test_logger_choice_is_checked(compose, monkeypatch):
    from importlib.util import find_spec

    from dsframe.config import validate
    from dsframe.errors import ConfigError

    assert validate(compose("recipe=sentiment")).logger.kind == "csv"
    assert validate(compose("recipe=sentiment", "logger=tensorboard")).logger.kind == "tensorboard"
    with pytest.raises(ConfigError, match="logger.kind='wandb' is not allowed: one of csv, tensorboard, mlflow"):
        validate(compose("recipe=sentiment", "logger.kind=wandb"))
    assert validate(compose("recipe=sentiment", "logger=mlflow")).logger.kind == "mlflow"
    import dsframe.loggers

    for absent, says in (("mlflow", "mlflow needs the package mlflow"), ("sqlalchemy", "default store needs sqlalchemy")):
        monkeypatch.setattr(dsframe.loggers, "find_spec", lambda m, absent=absent: None if m == absent else find_spec(m))
        with pytest.raises(ConfigError, match=says):
            validate(compose("recipe=sentiment", "logger=mlflow"))
    # a store of one's own needs no SQLAlchemy here
    assert validate(compose("recipe=sentiment", "logger=mlflow", "logger.tracking_uri=http://mlflow:5000")).logger
