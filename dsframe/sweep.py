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


@dataclass
class Job:
    number: str
    path: Path
    overrides: list[str]
    status: str
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


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
    from omegaconf import OmegaConf

    for d in dirs:
        cfg = d / ".hydra" / "config.yaml"
        if cfg.exists():
            node = OmegaConf.load(cfg).get("recipe", {}).get("summary")
            return OmegaConf.to_container(node) if node is not None else {}
    return {}


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


def render_csv(jobs: list[Job]) -> str:
    columns = list(dict.fromkeys(k for job in jobs for k in job.metrics))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["job", "overrides", "status", "error", *columns])
    for job in jobs:
        writer.writerow([job.number, " ".join(job.overrides), job.status, job.error,
                         *(job.metrics.get(c, "") for c in columns)])
    return buf.getvalue()


def render_markdown(jobs: list[Job], figures: list[str], fronts: list[Front], sweep_dir: Path) -> str:
    on_front = _front_membership(jobs, fronts)
    counts = {s: sum(j.status == s for j in jobs) for s in ("done", "failed", "incomplete")}
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(jobs)} jobs: {counts['done']} done, {counts['failed']} failed, {counts['incomplete']} incomplete.", ""]
    head = ["job", "overrides", "status", *figures] + (["Pareto"] if fronts else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in jobs:
        status = job.status if not job.error else f"{job.status}: {job.error}"
        row = [job.number, "`" + " ".join(job.overrides) + "`" if job.overrides else "", status.replace("|", "/"),
               *(_fmt(job.metrics.get(f)) for f in figures)]
        if fronts:
            row.append(", ".join(str(i + 1) for i, members in enumerate(on_front) if job.number in members))
        lines.append("| " + " | ".join(row) + " |")
    for i, front in enumerate(fronts):
        lines += ["", f"Front {i + 1}: {front.y} ({front.y_goal}) against {front.x} ({front.x_goal}); "
                  f"jobs on it: {', '.join(sorted(on_front[i], key=str)) or 'none'}."]
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
            ax.bar([j.number for j in done], [j.metrics[panel] for j in done], color="C0")
            ax.set_xlabel("job")
            ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True


def summarize(sweep_dir: str | Path) -> dict:
    """Write summary.csv / summary.md / summary.png into ``sweep_dir``; returns counts and paths."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DsframeError(f"sweep directory not found: {sweep_dir}")
    jobs, declared = read_sweep(sweep_dir)
    figures, fronts = figures_of(jobs, declared), fronts_of(declared)
    write_text(sweep_dir / "summary.csv", render_csv(jobs))
    write_text(sweep_dir / "summary.md", render_markdown(jobs, figures, fronts, sweep_dir))
    drawn = plot(jobs, figures, fronts, sweep_dir / "summary.png")
    result = {"jobs": len(jobs), "failed": sum(j.status == "failed" for j in jobs),
              "incomplete": sum(j.status == "incomplete" for j in jobs), "summary": str(sweep_dir / "summary.md")}
    if drawn:
        result["plot"] = str(sweep_dir / "summary.png")
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
            summarize(job_dir.parent)
        except Exception as exc:  # a summary problem must never fail the job itself
            log.warning("sweep summary not updated: %s", exc)

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
