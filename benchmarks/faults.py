"""Every injected fault on real processes, and a table of what survived.

    python benchmarks/faults.py --out benchmarks/results/faults.json     # ~10 min on 2 busy cores

Interruptions (``dsframe.faultinject.interrupt``): SIGTERM / SIGINT / SIGKILL of a single-process
fit, SIGTERM after the fit (outside Lightning's loop), and for a 2-rank DDP run and a 2-rank
tensor-parallel (hybrid tp=2) run: SIGTERM of the whole process group (as SLURM does), SIGTERM
and SIGKILL of rank 1, and (DDP) SIGKILL of the launching process. Each is followed by a rerun of the same command. ``survived``: non-zero
exit, no process left running, no traceback, the rerun finishes with every step trained and at
most one checkpoint interval trained twice (``lost_steps``).

Files and inputs: a NaN loss, a full disk while checkpointing, a damaged newest checkpoint
(truncated / zero bytes / garbage) and one of a differently shaped model, bad data files and bad
config values. ``survived``: one line naming the problem, exit non-zero, no traceback, the
earlier good checkpoint still loads. ``tracebacks`` counts the inputs that printed one.
Writes JSON (with ``machine_info()``) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dsframe import faultinject
from dsframe.io import write_json, write_text
from dsframe.machine import machine_info

INTERRUPTIONS = [  # (layout, signal, target, at_step)
    ("single", "SIGTERM", "group", 5), ("single", "SIGINT", "group", 5), ("single", "SIGKILL", "group", 7),
    ("ddp", "SIGTERM", "group", 3), ("ddp", "SIGTERM", "rank1", 3), ("ddp", "SIGKILL", "rank1", 3),
    ("ddp", "SIGKILL", "launcher", 3),
    ("hybrid", "SIGTERM", "group", 6), ("hybrid", "SIGTERM", "rank1", 6), ("hybrid", "SIGKILL", "rank1", 6),
]
TINY = ["recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=1.0", "checkpoint.every_n_steps=2"]
BAD_CONFIG = {
    "threads=abc": ["threads=abc"], "threads=1.5": ["threads=1.5"],
    "val_check_interval=0": ["trainer.val_check_interval=0"],
    "heads 5 of hidden 384": ["recipe=sentiment", "+model.hf_config.num_attention_heads=5"],
    "nested key that does not exist": ["recipe=sentiment", "model.hf_config.num_attention_heads=5"],
    "eval batch vs micro-batches": ["recipe=lm_hybrid_parallel", "data.eval_batch_size=30"],
    "typo in last stage's options": ["recipe=bert_compress", "+recipe.stages.evaluate.options.latency_repeat=3"],
    "checkpoint interval 0": ["checkpoint.every_n_steps=0"],
    "nan policy unknown": ["nonfinite_loss.policy=ignore"],
    "hydra _target_ in model": ["+model._target_=os.system"],
    "plugin named by import path": ["+recipe.stages.finetune.plugins=[os.system]"],
}


def one_line(stderr: str) -> bool:
    lines = [x for x in stderr.splitlines() if x.startswith("dsframe: error:")]
    return len(lines) == 1 and "Traceback" not in stderr


def run_cli(args: list[str], work: Path, plugin_dir: Path) -> tuple[int, str]:
    proc = faultinject.start(args, cwd=work, plugin_dir=plugin_dir)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def interruptions(work: Path, plugin_dir: Path) -> list[dict]:
    rows = []
    for layout, how, target, step in INTERRUPTIONS:
        out = faultinject.interrupt(work / f"{layout}-{how}-{target}", plugin_dir, layout, how, target, at_step=step)
        rows.append({"fault": out.fault, "injected": True, "survived": out.survived, "exit": out.rc,
                     "left_running": len(out.left_running), "rerun_exit": out.rerun_rc,
                     "lost_steps": out.lost_steps, "interval": out.interval, "traceback": out.traceback,
                     "seconds": out.seconds})
        print(rows[-1], flush=True)
    out = faultinject.interrupt(work / "single-finalize", plugin_dir, "single", "SIGTERM", in_finalize=True)
    rows.append({"fault": out.fault, "injected": True, "survived": out.survived and out.rc == 143, "exit": out.rc,
                 "left_running": len(out.left_running), "rerun_exit": out.rerun_rc, "lost_steps": out.lost_steps,
                 "interval": out.interval, "traceback": out.traceback, "seconds": out.seconds})
    return rows


def file_faults(work: Path, plugin_dir: Path) -> list[dict]:
    rows = []

    def row(fault: str, rc: int, err: str, kept: bool, says: str) -> None:
        rows.append({"fault": fault, "injected": True, "survived": rc not in (0, None) and one_line(err) and kept
                     and says in err, "exit": rc, "lost_steps": 0, "traceback": "Traceback" in err,
                     "message": next((x for x in err.splitlines() if x.startswith("dsframe: error:")), "")[:300]})
        print(rows[-1], flush=True)

    good = work / "good"
    rc, err = run_cli([*TINY, f"hydra.run.dir={good}"], work, plugin_dir)
    assert rc == 0, err

    def loads(path: Path) -> bool:
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"]) > 0
        except Exception:
            return False

    for damage in ("truncated", "zero-byte", "garbage", "other-shape"):
        run = work / f"ckpt-{damage}"
        shutil.copytree(good, run)
        stage = run / "finetune"
        (stage / "stage.json").unlink()
        (stage / "checkpoints" / "last.ckpt").unlink()
        newest = stage / "checkpoints" / "step-00000008.ckpt"
        extra = []
        if damage == "other-shape":
            extra = ["model.hf_config.intermediate_size=96"]
        else:
            data = newest.read_bytes()
            newest.write_bytes({"truncated": data[: len(data) // 2], "zero-byte": b"",
                                "garbage": b"\x00not a checkpoint" * 64}[damage])
        rc, err = run_cli([*TINY, f"hydra.run.dir={run}", *extra], work, plugin_dir)
        # a damaged file is named itself; another model's checkpoints are all refused, the first one named
        row(f"checkpoint:{damage}", rc, err, loads(stage / "checkpoints" / "step-00000006.ckpt"),
            "differently shaped model (model.encoder" if damage == "other-shape" else "step-00000008.ckpt")

    run = work / "nan"
    rc, err = run_cli([*TINY, f"hydra.run.dir={run}", "+recipe.stages.finetune.plugins=[fault_nan]",
                       "+plugins.fault_nan.at_step=5"], work, plugin_dir)
    row("nan-loss:stop", rc, err, loads(run / "finetune" / "checkpoints" / "step-00000004.ckpt"), "at step 5")
    run = work / "disk-full"
    rc, err = run_cli([*TINY, f"hydra.run.dir={run}", "+recipe.stages.finetune.plugins=[fault_disk_full]",
                       "+plugins.fault_disk_full.at_step=3"], work, plugin_dir)
    row("disk-full:checkpoint", rc, err, loads(run / "finetune" / "checkpoints" / "step-00000002.ckpt"), "disk is full")
    for name, content in (("empty", b""), ("binary", b"\x89PNG\r\n\x1a\n\x00\xff\xfe")):
        path = work / f"ratings-{name}.txt"
        path.write_bytes(content)
        rc, err = run_cli(["recipe=sentiment", "debug=tiny", f"data.path={path}", f"hydra.run.dir={work / name}"],
                          work, plugin_dir)
        row(f"data-file:{name}", rc, err, True, str(path))
    return rows


def bad_configs(work: Path, plugin_dir: Path) -> list[dict]:
    rows = []
    for name, args in BAD_CONFIG.items():
        started = time.monotonic()
        rc, err = run_cli([*args, f"hydra.run.dir={work / 'cfg'}"], work, plugin_dir)
        rows.append({"fault": f"config:{name}", "injected": True, "survived": rc != 0 and one_line(err),
                     "exit": rc, "lost_steps": 0, "traceback": "Traceback" in err,
                     "left_run_dir": (work / "cfg").exists(), "seconds": round(time.monotonic() - started, 1),
                     "message": next((x for x in err.splitlines() if x.startswith("dsframe: error:")), "")[:300]})
        print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = ["| fault | survived | exit | lost steps | traceback |", "|---|---|---|---|---|"]
    for r in result["faults"]:
        lines.append(f"| {r['fault']} | {'yes' if r['survived'] else '**no**'} | {r['exit']} | "
                     f"{r['lost_steps']} | {'**yes**' if r['traceback'] else 'no'} |")
    s = result["summary"]
    lines += ["", f"{s['survived']} of {s['injected']} faults survived; lost steps at most {s['max_lost_steps']} "
                  f"(checkpoint interval {s['interval']}); {result['tracebacks']} tracebacks.",
              "", f"Machine: {result['machine'].get('cpu_model', '')}, load {result['machine'].get('load_avg_1m', '')}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write (a .md table is written beside it)")
    parser.add_argument("--only", choices=("interruptions", "files", "configs"), default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsframe-faults-"))
    plugin_dir = faultinject.install(work / "plugins")
    started = time.monotonic()
    rows: list[dict] = []
    if args.only in (None, "configs"):
        rows += bad_configs(work, plugin_dir)
    if args.only in (None, "files"):
        rows += file_faults(work, plugin_dir)
    if args.only in (None, "interruptions"):
        rows += interruptions(work, plugin_dir)
    result = {
        "command": "python benchmarks/faults.py --out " + args.out + (f" --only {args.only}" if args.only else ""),
        "faults": rows,
        "tracebacks": sum(bool(r["traceback"]) for r in rows),
        "summary": {"injected": len(rows), "survived": sum(bool(r["survived"]) for r in rows),
                    "max_lost_steps": max((r["lost_steps"] for r in rows), default=0),
                    "interval": max((r.get("interval", 0) for r in rows), default=0)},
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine_info(),
    }
    write_json(args.out, result)
    write_text(Path(args.out).with_suffix(".md"), markdown(result))
    print(markdown(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
