"""Sweeps that summarise themselves.

Every job of a Hydra multirun (``python -m dsframe -m recipe=... key=a,b``) is one run directory
under the sweep directory. :class:`SweepSummary` (a Hydra callback, on by default) rewrites
``summary.csv``, ``summary.md`` and ``summary.png`` in the sweep directory after every job and at
the end, so a sweep that is stopped halfway still has its table. One row per job: its overrides,
its status (done / failed / incomplete), its error if it failed, and its figures.

Which figures, and which Pareto fronts to draw, the recipe declares::

    recipe:
      summary:
        figures: [report.final_acc, report.final_size_ratio]   # flattened metrics.json keys
        fronts:                                                 # optional: y against x
          - {x: report.final_size_ratio, y: report.final_acc, x_goal: max, y_goal: max}

Without ``figures``, the last stage's test metrics are shown. The CSV holds every number of every
job's ``metrics.json`` (keys flattened with dots: ``finetune.test.test/acc``).

The recipe may also declare the *objective* a search optimises (``hydra/sweeper=optuna_objective``)
and by which a grid's best job is picked::

    recipe:
      objective:
        metrics: [report.final_acc]                      # flattened metrics.json keys
        directions: [maximize]                           # maximize | minimize, one per metric
        weights: null                                    # [w, ...]: one value, sum of w·metric
        constraints: {report.final_size_ratio: {min: 8}} # a job outside them scores the worst value

A run returns its objective value(s) to Hydra (what Optuna reads); the summary gets an ``objective``
column, and ``best.json`` + ``best.yaml`` (the best job's composed config; with several objectives,
one ``best-<job>.yaml`` per job on the Pareto front).

``python -m dsframe summarize SWEEP_DIR`` rebuilds the summary of an existing sweep directory.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dsframe.errors import DsframeError
from dsframe.io import atomic_write, write_json, write_text

log = logging.getLogger("dsframe")

FAILED_FILE = "failed.json"  # written into a job's directory when the job stops with an error
GOALS = ("max", "min")


@dataclass
class Front:
    x: str
    y: str
    x_goal: str = "max"
    y_goal: str = "max"


DIRECTIONS = ("maximize", "minimize")


@dataclass
class Objective:
    metrics: list[str]
    directions: list[str]
    weights: Optional[list[float]] = None
    constraints: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def senses(self) -> list[str]:
        """The direction of each value returned: one for a weighted objective."""
        return self.directions[:1] if self.weights else self.directions


def parse_objective(raw: Any) -> Optional[Objective]:
    """``recipe.objective`` checked (ConfigError naming the key); None when the recipe declares none."""
    from dsframe.errors import ConfigError

    if not raw:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("recipe.objective", raw, "a mapping with metrics, directions, weights, constraints")
    unknown = sorted(set(raw) - {"metrics", "directions", "weights", "constraints"})
    if unknown:
        raise ConfigError(f"recipe.objective.{unknown[0]}", raw[unknown[0]],
                          "a key of 'recipe.objective': metrics, directions, weights, constraints")
    metrics = raw.get("metrics")
    if isinstance(metrics, str):
        metrics = [metrics]
    if not metrics or not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        raise ConfigError("recipe.objective.metrics", metrics, "a non-empty list of metric names (e.g. report.final_acc)")
    directions = raw.get("directions") or ["maximize"] * len(metrics)
    if isinstance(directions, str):
        directions = [directions] * len(metrics)
    if not isinstance(directions, list) or any(d not in DIRECTIONS for d in directions):
        raise ConfigError("recipe.objective.directions", directions, "a list of maximize | minimize")
    weights = raw.get("weights")
    if weights is not None:
        if (not isinstance(weights, list) or len(weights) != len(metrics)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
            raise ConfigError("recipe.objective.weights", weights, f"null or a list of {len(metrics)} numbers")
        if len(set(directions)) != 1:
            raise ConfigError("recipe.objective.directions", directions,
                              "one direction for a weighted objective (give a metric to minimise a negative weight)")
    elif len(directions) != len(metrics):
        raise ConfigError("recipe.objective.directions", directions, f"{len(metrics)} directions, one per metric")
    constraints = raw.get("constraints") or {}
    if not isinstance(constraints, dict):
        raise ConfigError("recipe.objective.constraints", constraints, "a mapping metric -> {min: x, max: y}")
    for key, bounds in constraints.items():
        if (not isinstance(bounds, dict) or not bounds or set(bounds) - {"min", "max"}
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds.values())):
            raise ConfigError(f"recipe.objective.constraints.{key}", bounds, "a mapping {min: x, max: y} (either or both)")
    return Objective(list(metrics), list(directions), [float(w) for w in weights] if weights else None,
                     {k: {b: float(v) for b, v in c.items()} for k, c in constraints.items()})


def feasible(metrics: dict[str, float], objective: Objective) -> bool:
    for key, bounds in objective.constraints.items():
        value = metrics.get(key)
        if value is None or value < bounds.get("min", -math.inf) or value > bounds.get("max", math.inf):
            return False
    return True


def objective_value(metrics: dict[str, float], objective: Objective) -> Optional[float | list[float]]:
    """What a run returns to the sweeper: one float (one metric, or the weighted sum) or one per
    metric. A run outside the constraints scores the worst value (-inf when maximising, +inf when
    minimising); a run without the metrics returns None (the sweeper marks the trial failed)."""
    if any(m not in metrics for m in objective.metrics):
        return None
    if not feasible(metrics, objective):
        values = [-math.inf if d == "maximize" else math.inf for d in objective.senses]
    elif objective.weights:
        values = [sum(w * metrics[m] for w, m in zip(objective.weights, objective.metrics))]
    else:
        values = [metrics[m] for m in objective.metrics]
    return values[0] if len(values) == 1 else values


@dataclass
class Job:
    number: str
    path: Path
    overrides: list[str]
    status: str
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    objective: Optional[float | list[float]] = None


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict, keyed ``a.b.c``."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def _read_yaml_list(path: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(x) for x in OmegaConf.load(path)] if path.exists() else []


def read_job(path: Path, sweep_overrides: set[str]) -> Job:
    """One job directory: overrides (those that differ from the sweep's shared ones), status, figures."""
    overrides = [o for o in _read_yaml_list(path / ".hydra" / "overrides.yaml") if o not in sweep_overrides]
    metrics_file = path / "metrics.json"
    metrics = flatten(json.loads(metrics_file.read_text())) if metrics_file.exists() else {}
    failed = path / FAILED_FILE
    if failed.exists():
        return Job(path.name, path, overrides, "failed", json.loads(failed.read_text()).get("error", ""), metrics)
    return Job(path.name, path, overrides, "done" if metrics_file.exists() else "incomplete", "", metrics)


def read_sweep(sweep_dir: Path) -> tuple[list[Job], dict]:
    """Every job of a sweep directory (numbered sub-folders holding ``.hydra/``) and its recipe's
    ``summary`` declaration."""
    sweep_dir = Path(sweep_dir)
    dirs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()),
                  key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    if not dirs:
        raise DsframeError(f"{sweep_dir} holds no sweep jobs (sub-folders with a .hydra/ folder)")
    all_overrides = [set(_read_yaml_list(d / ".hydra" / "overrides.yaml")) for d in dirs]
    shared = set.intersection(*all_overrides) if len(dirs) > 1 else set()
    jobs = [read_job(d, shared) for d in dirs]
    return jobs, _declaration(dirs)


def _declaration(dirs: list[Path]) -> dict:
    """The recipe's ``summary`` declaration, with its ``objective`` under the key ``objective``."""
    from omegaconf import OmegaConf

    for d in dirs:
        cfg = d / ".hydra" / "config.yaml"
        if cfg.exists():
            recipe = OmegaConf.load(cfg).get("recipe", {})
            declared = OmegaConf.to_container(recipe.get("summary") or OmegaConf.create({}))
            objective = recipe.get("objective")
            if objective:
                declared["objective"] = OmegaConf.to_container(objective)
            return declared
    return {}


def best_jobs(jobs: list[Job], objective: Objective) -> list[Job]:
    """The best finished job (one objective value), or the jobs on the Pareto front (several);
    jobs outside the constraints or without the metrics are never best."""
    scored = [j for j in jobs if j.status == "done" and j.objective is not None]
    values = {j.number: (j.objective if isinstance(j.objective, list) else [j.objective]) for j in scored}
    scored = [j for j in scored if all(math.isfinite(v) for v in values[j.number])]
    signs = [1 if d == "maximize" else -1 for d in objective.senses]
    keys = {j.number: [s * v for s, v in zip(signs, values[j.number])] for j in scored}
    if len(signs) == 1:
        return [max(scored, key=lambda j: keys[j.number][0])] if scored else []
    return [j for j in scored if not any(all(o >= v for o, v in zip(keys[k.number], keys[j.number]))
                                         and keys[k.number] != keys[j.number] for k in scored)]


def write_best(sweep_dir: Path, best: list[Job], objective: Objective) -> None:
    """best.json (jobs, overrides, values) and the best job's composed config as best.yaml (with
    several objectives, best-<job>.yaml for every job on the front)."""
    for stale in [*sweep_dir.glob("best-*.yaml"), sweep_dir / "best.yaml"]:
        stale.unlink(missing_ok=True)
    for job in best:
        source = job.path / ".hydra" / "config.yaml"
        if source.exists():
            name = "best.yaml" if len(objective.senses) == 1 else f"best-{job.number}.yaml"
            write_text(sweep_dir / name, source.read_text())
    write_json(sweep_dir / "best.json", {
        "objective": {"metrics": objective.metrics, "directions": objective.directions,
                      "weights": objective.weights, "constraints": objective.constraints},
        "best": [{"job": j.number, "dir": str(j.path), "overrides": j.overrides, "value": j.objective} for j in best]})


def figures_of(jobs: list[Job], declared: dict) -> list[str]:
    figures = list(declared.get("figures") or [])
    if figures:
        return figures
    seen: list[str] = []
    for job in jobs:  # default: the last stage's test metrics
        stages = list(dict.fromkeys(k.split(".")[0] for k in job.metrics))
        for key in job.metrics:
            if stages and key.startswith(f"{stages[-1]}.test.") and key not in seen:
                seen.append(key)
    return seen


def fronts_of(declared: dict) -> list[Front]:
    fronts = []
    for i, raw in enumerate(declared.get("fronts") or []):
        front = Front(**raw)
        for goal in (front.x_goal, front.y_goal):
            if goal not in GOALS:
                raise DsframeError(f"recipe.summary.fronts[{i}]: goal '{goal}' is not one of {', '.join(GOALS)}")
        fronts.append(front)
    return fronts


def pareto(points: list[tuple[float, float]], x_goal: str = "max", y_goal: str = "max") -> list[bool]:
    """For each point, whether no other point is at least as good on both axes and better on one."""
    sx, sy = (1 if x_goal == "max" else -1), (1 if y_goal == "max" else -1)
    keys = [(sx * x, sy * y) for x, y in points]
    return [not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in keys) for x, y in keys]


def _fmt(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}"


def _objective_text(value: Optional[float | list[float]]) -> str:
    if value is None:
        return ""
    return " ".join(_fmt(v) if math.isfinite(v) else "infeasible" for v in (value if isinstance(value, list) else [value]))


def render_csv(jobs: list[Job], with_objective: bool = False) -> str:
    columns = list(dict.fromkeys(k for job in jobs for k in job.metrics))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["job", "overrides", "status", "error", *(["objective"] if with_objective else []), *columns])
    for job in jobs:
        writer.writerow([job.number, " ".join(job.overrides), job.status, job.error,
                         *([_objective_text(job.objective)] if with_objective else []),
                         *(job.metrics.get(c, "") for c in columns)])
    return buf.getvalue()


def render_markdown(jobs: list[Job], figures: list[str], fronts: list[Front], sweep_dir: Path,
                    objective: Optional[Objective] = None, best: Optional[list[Job]] = None) -> str:
    on_front = _front_membership(jobs, fronts)
    counts = {s: sum(j.status == s for j in jobs) for s in ("done", "failed", "incomplete")}
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(jobs)} jobs: {counts['done']} done, {counts['failed']} failed, {counts['incomplete']} incomplete.", ""]
    head = ["job", "overrides", "status", *figures] + (["objective"] if objective else []) + (["Pareto"] if fronts else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in jobs:
        status = job.status if not job.error else f"{job.status}: {job.error}"
        row = [job.number, "`" + " ".join(job.overrides) + "`" if job.overrides else "", status.replace("|", "/"),
               *(_fmt(job.metrics.get(f)) for f in figures)]
        if objective:
            mark = " **best**" if best and job in best else ""
            row.append(_objective_text(job.objective) + mark)
        if fronts:
            row.append(", ".join(str(i + 1) for i, members in enumerate(on_front) if job.number in members))
        lines.append("| " + " | ".join(row) + " |")
    for i, front in enumerate(fronts):
        lines += ["", f"Front {i + 1}: {front.y} ({front.y_goal}) against {front.x} ({front.x_goal}); "
                  f"jobs on it: {', '.join(sorted(on_front[i], key=str)) or 'none'}."]
    if objective:
        goal = " and ".join(f"{d} {m}" for d, m in zip(objective.directions, objective.metrics))
        if objective.weights:
            goal = f"{objective.directions[0]} " + " + ".join(f"{w:g}·{m}" for w, m in zip(objective.weights, objective.metrics))
        limits = "; ".join(f"{k} in [{b.get('min', '-inf')}, {b.get('max', 'inf')}]" for k, b in objective.constraints.items())
        lines += ["", f"Objective: {goal}" + (f", subject to {limits}" if limits else "") + ". "
                  + ((f"Best: job {best[0].number} (config in best.yaml)." if len(objective.senses) == 1 else
                      f"Pareto front: jobs {', '.join(j.number for j in best)} (configs in best-<job>.yaml).")
                     if best else "No finished job meets the objective's constraints.")]
    return "\n".join(lines) + "\n"


def _front_membership(jobs: list[Job], fronts: list[Front]) -> list[set[str]]:
    out = []
    for front in fronts:
        usable = [j for j in jobs if front.x in j.metrics and front.y in j.metrics]
        marks = pareto([(j.metrics[front.x], j.metrics[front.y]) for j in usable], front.x_goal, front.y_goal)
        out.append({j.number for j, m in zip(usable, marks) if m})
    return out


def plot(jobs: list[Job], figures: list[str], fronts: list[Front], png: Path) -> bool:
    """Pareto fronts (each job a point, the front drawn and its jobs labelled), or the first figure
    per job as bars when the recipe declares no front. False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = fronts or ([figures[0]] if figures else [])
    if not panels or not any(j.metrics for j in jobs):
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    members = _front_membership(jobs, fronts)
    for ax, panel, i in zip(axes[0], panels, range(len(panels))):
        if isinstance(panel, Front):
            usable = [j for j in jobs if panel.x in j.metrics and panel.y in j.metrics]
            xs = [j.metrics[panel.x] for j in usable]
            ys = [j.metrics[panel.y] for j in usable]
            ax.scatter(xs, ys, c="0.6", label="job")
            front = sorted((j.metrics[panel.x], j.metrics[panel.y], j.number) for j in usable if j.number in members[i])
            if front:
                ax.plot([p[0] for p in front], [p[1] for p in front], "o-", c="C3", label="Pareto front")
            for j, x, y in zip(usable, xs, ys):
                ax.annotate(f"{j.number}: {' '.join(j.overrides)}", (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel(f"{panel.x} ({panel.x_goal})")
            ax.set_ylabel(f"{panel.y} ({panel.y_goal})")
            ax.legend(fontsize=8)
        else:
            done = [j for j in jobs if panel in j.metrics]
            ax.bar(range(len(done)), [j.metrics[panel] for j in done], color="C0")
            ax.set_xticks(range(len(done)), [j.number for j in done])
            ax.set_xlabel("job")
            ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True


def summarize(sweep_dir: str | Path) -> dict:
    """Write summary.csv / summary.md / summary.png (and best.json / best.yaml when the recipe declares
    an objective) into ``sweep_dir``; returns counts and paths."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DsframeError(f"sweep directory not found: {sweep_dir}")
    jobs, declared = read_sweep(sweep_dir)
    figures, fronts = figures_of(jobs, declared), fronts_of(declared)
    objective = parse_objective(declared.get("objective"))
    best: list[Job] = []
    if objective is not None:
        for job in jobs:
            job.objective = objective_value(job.metrics, objective) if job.status == "done" else None
        best = best_jobs(jobs, objective)
        write_best(sweep_dir, best, objective)
    write_text(sweep_dir / "summary.csv", render_csv(jobs, objective is not None))
    write_text(sweep_dir / "summary.md", render_markdown(jobs, figures, fronts, sweep_dir, objective, best))
    drawn = plot(jobs, figures, fronts, sweep_dir / "summary.png")
    result = {"jobs": len(jobs), "failed": sum(j.status == "failed" for j in jobs),
              "incomplete": sum(j.status == "incomplete" for j in jobs), "summary": str(sweep_dir / "summary.md")}
    if drawn:
        result["plot"] = str(sweep_dir / "summary.png")
    if objective is not None:
        result["best"] = [j.number for j in best]
    return result


def record_failure(job_dir: Path, error: BaseException) -> None:
    """Mark a job as failed (one line of why), so the sweep goes on and its summary shows the row."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    write_json(Path(job_dir) / FAILED_FILE, {"error": text, "type": type(error).__name__})


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """Hydra callback: keeps the sweep's summary up to date and ends a sweep with failed jobs non-zero."""

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = config.hydra if "hydra" in config else HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(hydra_cfg.runtime.output_dir)
        status = getattr(getattr(job_return, "status", None), "name", "")
        if status == "FAILED" and not (job_dir / FAILED_FILE).exists():
            record_failure(job_dir, job_return._return_value)
        try:
            result = summarize(job_dir.parent)
        except Exception as exc:  # a summary problem must never fail the job itself
            log.warning("sweep summary not updated: %s", exc)
            return
        # Hydra logs each job as it starts ("#k : overrides" after "Launching N jobs"): this says how it ended
        done = result["jobs"] - result["incomplete"]
        log.info("sweep: job #%s %s; %d finished so far (%d failed), summary in %s", hydra_cfg.job.get("num", "?"),
                 "failed" if (job_dir / FAILED_FILE).exists() else "done", done, result["failed"], result["summary"])

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        result = summarize(sweep_dir)
        log.info("sweep summary: %s (%d jobs, %d failed)", result["summary"], result["jobs"], result["failed"])
        if result["failed"]:
            import sys

            print(f"dsframe: error: {result['failed']} of {result['jobs']} sweep jobs failed: see {result['summary']}",
                  file=sys.stderr)
            sys.exit(1)
