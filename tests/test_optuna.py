"""The recipe's objective: checked like any option, returned to Hydra sweepers, best job(s) written
out; a real 3-trial Optuna search through hydra-optuna-sweeper."""
import csv
import json
import math

import pytest
from omegaconf import OmegaConf

from dsframe.errors import ConfigError
from dsframe.sweep import objective_value, parse_objective, summarize
from tests.conftest import run_cli


def test_objective_values_weights_and_constraints():
    m = {"report.acc": 0.8, "report.size": 12.0, "report.speed": 3.0}
    assert objective_value(m, parse_objective({"metrics": ["report.acc"]})) == 0.8
    both = parse_objective({"metrics": ["report.acc", "report.speed"], "directions": ["maximize", "maximize"]})
    assert objective_value(m, both) == [0.8, 3.0]
    weighted = parse_objective({"metrics": ["report.acc", "report.speed"], "directions": ["maximize"],
                                "weights": [1.0, 0.1]})
    assert objective_value(m, weighted) == pytest.approx(0.8 + 0.1 * 3.0)
    capped = parse_objective({"metrics": ["report.acc"], "constraints": {"report.size": {"max": 10}}})
    assert objective_value(m, capped) == -math.inf  # too big: the worst value when maximising
    assert objective_value({**m, "report.size": 9.5}, capped) == 0.8
    minimise = parse_objective({"metrics": ["report.size"], "directions": "minimize",
                                "constraints": {"report.acc": {"min": 0.9}}})
    assert objective_value(m, minimise) == math.inf
    assert objective_value({"report.size": 1.0}, capped) is None  # metric missing: a failed trial


@pytest.mark.parametrize("raw, key", [
    ({"metrics": []}, "recipe.objective.metrics"),
    ({"metrics": ["a"], "directions": ["up"]}, "recipe.objective.directions"),
    ({"metrics": ["a", "b"], "directions": ["maximize"]}, "recipe.objective.directions"),
    ({"metrics": ["a", "b"], "weights": [1.0]}, "recipe.objective.weights"),
    ({"metrics": ["a"], "constraints": {"b": {"below": 3}}}, "recipe.objective.constraints.b"),
    ({"metrics": ["a"], "goal": "max"}, "recipe.objective.goal"),
])
def test_bad_objective_names_its_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_objective(raw)


def test_objective_is_checked_with_the_config(compose):
    from dsframe.config import validate

    assert validate(compose("recipe=bert_compress")).recipe.objective["constraints"] == {
        "report.final_size_ratio": {"min": 8.0}}
    with pytest.raises(ConfigError, match="recipe.objective.directions"):
        validate(compose("recipe=sentiment", "recipe.objective.directions=[largest]"))


def _job(sweep, num, overrides, metrics, objective):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"recipe": {"name": "r", "objective": objective}, "seed": num}),
                   d / ".hydra" / "config.yaml")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps({"report": metrics}))


def test_summary_marks_the_best_feasible_job_and_writes_its_config(tmp_path):
    objective = {"metrics": ["report.acc"], "constraints": {"report.ratio": {"min": 8}}}
    for num, (acc, ratio) in enumerate([(0.84, 9.0), (0.86, 7.0), (0.85, 8.5)]):
        _job(tmp_path, num, ["recipe=r", f"x={num}"], {"acc": acc, "ratio": ratio}, objective)
    _job(tmp_path, 3, ["recipe=r", "x=3"], None, objective)  # never finished
    result = summarize(tmp_path)
    assert result["best"] == ["2"]  # job 1 is more accurate but only 7x smaller
    best = json.loads((tmp_path / "best.json").read_text())
    assert [b["job"] for b in best["best"]] == ["2"] and best["best"][0]["overrides"] == ["x=2"]
    assert OmegaConf.load(tmp_path / "best.yaml").seed == 2
    rows = {r["job"]: r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert rows["1"]["objective"] == "infeasible" and rows["2"]["objective"] == "0.85" and rows["3"]["objective"] == ""
    md = (tmp_path / "summary.md").read_text()
    assert "| 0.85 **best** |" in md and "subject to report.ratio in [8.0, inf]" in md


def test_several_objectives_give_a_pareto_front(tmp_path):
    objective = {"metrics": ["report.acc", "report.ms"], "directions": ["maximize", "minimize"]}
    points = [(0.84, 5.0), (0.86, 7.0), (0.83, 6.0), (0.84, 4.0)]  # job 0 dominated by 3, job 2 by 0 and 3
    for num, (acc, ms) in enumerate(points):
        _job(tmp_path, num, ["recipe=r", f"x={num}"], {"acc": acc, "ms": ms}, objective)
    assert summarize(tmp_path)["best"] == ["1", "3"]
    assert sorted(p.name for p in tmp_path.glob("best*")) == ["best-1.yaml", "best-3.yaml", "best.json"]


@pytest.mark.slow
def test_optuna_search_of_three_trials(tmp_path):
    proc = run_cli("-m", "hydra/sweeper=optuna_objective", "recipe=sentiment", "debug=tiny",
                   "trainer.limit_train_batches=1", "optim.lr=interval(1e-5,1e-3)", "hydra.sweeper.n_trials=3",
                   "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["done"] * 3
    lrs = {float(r["overrides"].split("=")[1]) for r in rows}
    assert len(lrs) == 3 and all(1e-5 <= lr <= 1e-3 for lr in lrs)  # sampled from the interval
    accs = {r["job"]: float(r["finetune.test.test/acc"]) for r in rows}
    best = json.loads((sweep / "best.json").read_text())["best"][0]
    assert accs[best["job"]] == max(accs.values()) == best["value"]
    optuna = OmegaConf.load(sweep / "optimization_results.yaml")  # Optuna's own record agrees
    assert optuna.best_value == pytest.approx(best["value"])
    assert (sweep / "best.yaml").read_text() == (sweep / best["job"] / ".hydra" / "config.yaml").read_text()
    for job in ("0", "1", "2"):  # every job leaves its run record (dsframe.records.RunRecord)
        record = json.loads((sweep / job / "run.json").read_text())
        assert record["status"] == "done" and record["stages"]["finetune"] > 0
