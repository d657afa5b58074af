"""The scheduler in a real run: ``recipe=sentiment_scheduled`` against the same recipe without the
scheduler, over several seeds. Reports test accuracy (mean ± std), wall time (median, min/max),
the decision log's actions, and whether the global step is continuous and the loss fell across
every change. Timings on a shared machine: re-measure on a quiet one.

    python benchmarks/scheduler_online.py --out benchmarks/results/scheduler_online.json --seeds 0 1 2

``--advisor auto off`` replaces the one scheduled run per seed by one per advisor mode
(``plugins.scheduler.advisor``, the state's advice component online), ``--overrides`` adds
overrides to every scheduled run (e.g. a trained policy file) and ``--no-static`` leaves the
unscheduled run out, e.g. the trained table acting greedily with and without advice::

    python benchmarks/scheduler_online.py --out outputs/advice.json --seeds 0 1 2 --serial --no-static \\
        --advisor auto off --overrides plugins.scheduler.policy=$PWD/benchmarks/results/scheduler.policy.json \\
        plugins.scheduler.forced_actions=[] plugins.scheduler.learn=false plugins.scheduler.max_moves=3 \\
        plugins.scheduler.lam=1.0 plugins.scheduler.advisor_trace=$PWD/benchmarks/results/scheduler_profile
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dsframe.io import write_json, write_text
from dsframe.machine import machine_info


def run(tag: str, seed: int, root: Path, extra: list[str]) -> dict:
    out = root / f"{tag}-{seed}"
    cmd = [sys.executable, "-m", "dsframe", "recipe=sentiment_scheduled", f"seed={seed}",
           f"hydra.run.dir={out}", "trainer.enable_progress_bar=false", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    stage = out / "finetune"
    metrics = json.loads((stage / "metrics.json").read_text())
    result = {"seed": seed, "seconds": round(seconds, 1), "test_acc": metrics["test"]["test/acc"],
              "dir": str(out)}
    steps_csv = stage / "scheduler_steps.csv"
    if steps_csv.exists():
        steps = list(csv.DictReader(open(steps_csv)))
        decisions = list(csv.DictReader(open(stage / "decisions.csv")))
        numbers = [int(r["step"]) for r in steps]
        loss = [float(r["loss"]) for r in steps]
        changes = [d for d in decisions if d.get("applied") not in ("none", "", None)]
        advice = [d.get("advice", "") for d in decisions]
        # loss "keeps falling": mean loss of the window after each change below the run's first window
        window = 6
        first = statistics.mean(loss[:window])
        after = []
        for d in changes:
            i = numbers.index(int(d["step"])) if int(d["step"]) in numbers else len(numbers) - 1
            seg = loss[i + 1:i + 1 + window] or loss[-window:]
            after.append(round(statistics.mean(seg), 4))
        result.update({
            "global_step_continuous": numbers == list(range(1, len(numbers) + 1)),
            "steps": len(numbers), "actions_applied": [d["action"] for d in changes],
            "decisions": len(decisions), "loss_first_window": round(first, 4),
            "advice_moves": sum(a not in ("", "keep") for a in advice), "advice_given": any(advice),
            "loss_after_each_change": after, "loss_last_window": round(statistics.mean(loss[-window:]), 4),
            "segments": len(json.loads((stage / "segments.json").read_text())) if (stage / "segments.json").exists() else 0,
        })
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default="outputs/scheduler_online")
    ap.add_argument("--serial", action="store_true", help="one run at a time (timings on a quiet machine)")
    ap.add_argument("--advisor", nargs="+", choices=["auto", "off", "trace"],
                    help="one scheduled run per advisor mode (scheduled-<mode>) instead of one 'scheduled' run")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra overrides of every scheduled run")
    ap.add_argument("--no-static", action="store_true", help="leave the unscheduled run out")
    args = ap.parse_args()
    root = Path(args.root)
    extra = {f"scheduled-{m}": [*args.overrides, f"plugins.scheduler.advisor={m}"] for m in args.advisor} \
        if args.advisor else {"scheduled": list(args.overrides)}
    if not args.no_static:
        extra["static"] = ["recipe.stages.finetune.plugins=[]"]
    rows = {tag: [] for tag in extra}
    # the two runs of a seed side by side: on a shared machine this halves the wait; wall times
    # are then those of two runs sharing the cores (re-measure with --serial on a quiet machine)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1 if args.serial else 2) as pool:
        for seed in args.seeds:
            futures = {tag: pool.submit(run, tag, seed, root, extra[tag]) for tag in rows}
            for tag, fut in futures.items():
                rows[tag].append(fut.result())
            print(json.dumps({k: v[-1] for k, v in rows.items()}), flush=True)
    summary = {}
    for tag, rs in rows.items():
        accs, secs = [r["test_acc"] for r in rs], [r["seconds"] for r in rs]
        summary[tag] = {"test_acc_mean": round(statistics.mean(accs), 4),
                        "test_acc_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                        "seconds_median": statistics.median(secs), "seconds_min": min(secs), "seconds_max": max(secs)}
        if all("steps" in r for r in rs):
            summary[tag].update({"steps_median": statistics.median(r["steps"] for r in rs),
                                 "changes_median": statistics.median(len(r["actions_applied"]) for r in rs),
                                 "advice_moves_median": statistics.median(r["advice_moves"] for r in rs)})
    result = {"command": " ".join(sys.argv), "machine": machine_info(), "parallel_runs": not args.serial,
              "runs": rows, "summary": summary}
    write_json(args.out, result)
    lines = ["| run | test acc (mean ± std) | wall s (median [min, max]) | steps | changes | advice moves |",
             "|---|---|---|---|---|---|"]
    for tag, s in summary.items():
        lines.append(f"| {tag} | {s['test_acc_mean']:.4f} ± {s['test_acc_std']:.4f} | "
                     f"{s['seconds_median']} [{s['seconds_min']}, {s['seconds_max']}] | "
                     + " | ".join(str(s.get(k, "–")) for k in ("steps_median", "changes_median", "advice_moves_median"))
                     + " |")
    write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
