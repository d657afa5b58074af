"""Sweeps summarise themselves: one row per job (failed ones included), figures, Pareto fronts."""
import csv
import json

import pytest
from omegaconf import OmegaConf

from dsframe.errors import DsframeError
from dsframe.sweep import pareto, summarize
from tests.conftest import run_cli


def test_pareto_marks_exactly_the_undominated_points():
    pts = [(1.0, 0.9), (2.0, 0.8), (1.5, 0.7), (3.0, 0.5), (3.0, 0.4)]
    assert pareto(pts) == [True, True, False, True, False]
    # minimise x (e.g. latency), maximise y (accuracy)
    assert pareto(pts, x_goal="min") == [True, False, False, False, False]
    assert pareto([(1.0, 1.0), (1.0, 1.0)]) == [True, True]  # ties dominate nobody


def _job(sweep, num, overrides, metrics=None, failed=None, summary=None):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"recipe": {"name": "r", "summary": summary or {}}}), d / ".hydra" / "config.yaml")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if failed:
        (d / "failed.json").write_text(json.dumps({"error": failed}))


def test_summary_of_a_sweep_directory(tmp_path):
    summary = {"figures": ["report.acc", "report.size"],
               "fronts": [{"x": "report.size", "y": "report.acc", "x_goal": "min", "y_goal": "max"}]}
    common = "recipe=bert_compress"
    _job(tmp_path, 0, [common, "plugins.prune.amount=0.3"], {"report": {"acc": 85.0, "size": 12.0}}, summary=summary)
    _job(tmp_path, 1, [common, "plugins.prune.amount=0.5"], {"report": {"acc": 84.0, "size": 9.0}}, summary=summary)
    _job(tmp_path, 2, [common, "plugins.prune.amount=0.7"], {"report": {"acc": 83.0, "size": 10.0}}, summary=summary)
    _job(tmp_path, 3, [common, "plugins.prune.amount=0.9"], failed="plugins.prune.amount=0.9 is not allowed: x",
         summary=summary)
    _job(tmp_path, 4, [common, "plugins.prune.amount=0.1"], summary=summary)  # still running / killed
    result = summarize(tmp_path)
    assert result == {"jobs": 5, "failed": 1, "incomplete": 1, "summary": str(tmp_path / "summary.md"),
                      "plot": str(tmp_path / "summary.png")}
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed", "incomplete"]
    assert rows[1]["overrides"] == "plugins.prune.amount=0.5"  # the shared override is left out
    assert float(rows[2]["report.size"]) == 10.0 and rows[3]["error"].startswith("plugins.prune.amount=0.9")
    md = (tmp_path / "summary.md").read_text()
    assert "5 jobs: 3 done, 1 failed, 1 incomplete" in md
    assert "jobs on it: 0, 1." in md  # job 2 (bigger and less accurate than job 1) is dominated
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_summarize_command_and_its_errors(tmp_path):
    _job(tmp_path, 0, ["seed=1"], {"finetune": {"fit": {"val/acc": 0.4}, "test": {"test/acc": 0.5}}})
    _job(tmp_path, 1, ["seed=2"], {"finetune": {"fit": {"val/acc": 0.6}, "test": {"test/acc": 0.75}}})
    proc = run_cli("summarize", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 jobs, 0 failed" in proc.stdout
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | `seed=2` | done | 0.75 |" in md  # default figure: the last stage's test metrics
    with pytest.raises(DsframeError, match="holds no sweep jobs"):
        summarize(tmp_path / "0" / ".hydra")
    proc = run_cli("summarize", str(tmp_path / "missing"), cwd=tmp_path)
    assert proc.returncode == 1 and "sweep directory not found" in proc.stderr


def test_bad_summary_declaration_is_a_config_error(compose):
    from dsframe.config import validate
    from dsframe.errors import ConfigError

    with pytest.raises(ConfigError, match="recipe.summary.fronts.0.y_goal"):
        validate(compose("+recipe.summary.fronts=[{x: a, y: b, y_goal: up}]"))


@pytest.mark.slow
def test_real_sweep_keeps_going_past_a_failed_job_and_summarises(tmp_path):
    proc = run_cli("-m", "recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=1",
                   "optim.lr=0.0001,0", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 1
    assert "1 of 2 sweep jobs failed" in proc.stderr and "Traceback" not in proc.stderr
    out = proc.stdout + proc.stderr  # each job's end is reported as it happens
    assert "sweep: job #0 done; 1 finished so far (0 failed)" in out
    assert "sweep: job #1 failed; 2 finished so far (1 failed)" in out
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert [(r["overrides"], r["status"]) for r in rows] == [("optim.lr=0.0001", "done"), ("optim.lr=0", "failed")]
    assert rows[1]["error"] == "optim.lr=0.0 is not allowed: a float > 0"
    assert 0.0 <= float(rows[0]["finetune.test.test/acc"]) <= 1.0
    assert (tmp_path / "sweep" / "0" / "finetune" / "model.pt").exists()
