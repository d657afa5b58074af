"""The scheduler's record in the stage directory: ``decisions.csv`` (one row per decision),
``scheduler_steps.csv`` (setting and loss per training step) and ``scheduler.png`` (batch size,
precision, workers and loss over steps with the decisions that changed something marked)."""
from __future__ import annotations

import csv
from pathlib import Path

from dsframe.io import atomic_write

DECISION_FIELDS = ("step", "epoch", "time_s", "state", "state_view", "advice", "advice_goal", "action", "how", "reward", "td_error",
                   "epsilon", "q_values", "batch_size", "precision", "workers", "new_batch_size",
                   "new_precision", "new_workers", "applied", "utilisation", "free_memory", "comm_latency_ms",
                   "noise_scale", "loss", "lr", "restart_s")
STEP_FIELDS = ("step", "loss", "batch_size", "global_batch", "precision", "workers", "lr")


def write_csv(path: Path, fields: tuple, rows: list[dict]) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, _write)


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


COLOURS = {"batch_up": "tab:green", "batch_down": "tab:olive", "precision_low": "tab:purple",
           "precision_full": "tab:pink", "workers_up": "tab:blue", "workers_down": "tab:cyan",
           "oom_backoff": "tab:red"}


def plot(stage_dir: Path, png: Path) -> bool:
    steps = read_csv(stage_dir / "scheduler_steps.csv")
    decisions = read_csv(stage_dir / "decisions.csv")
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [int(r["step"]) for r in steps]
    panels = [("global batch", [int(r["global_batch"]) for r in steps]),
              ("low precision", [0 if r["precision"] == "32-true" else 1 for r in steps]),
              ("workers", [int(r["workers"]) for r in steps]),
              ("train loss", [float(r["loss"]) for r in steps])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 8), sharex=True)
    for ax, (label, ys) in zip(axes, panels):
        ax.plot(x, ys, drawstyle="steps-post" if label != "train loss" else "default", lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    seen = set()
    for d in decisions:
        if d.get("applied") in ("", "none", None):
            continue
        colour = COLOURS.get(d["action"], "grey")
        for ax in axes:
            ax.axvline(int(d["step"]), color=colour, ls="--", lw=0.9,
                       label=d["action"] if d["action"] not in seen and ax is axes[0] else None)
        seen.add(d["action"])
    if seen:
        axes[0].legend(fontsize=7, ncol=4, loc="upper left")
    axes[-1].set_xlabel("global step")
    axes[0].set_title("scheduler: setting and loss over steps (dashed: decisions that changed the setting)")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True
