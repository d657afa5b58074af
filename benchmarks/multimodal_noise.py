"""Choose the av_digits noise levels on the VALIDATION split and record the sweep.

For each modality, every candidate level of its noise is built and scored by a small probe on
that modality alone (dsframe_multimodal.calibrate); the level whose val accuracy is nearest
--target is chosen. The test split is never read.

    python benchmarks/multimodal_noise.py --out benchmarks/results/multimodal_noise.json
    python benchmarks/multimodal_noise.py --modalities text --out /tmp/text.json
"""
from __future__ import annotations

import argparse
import time

from dsframe.io import write_json, write_text
from dsframe.machine import machine_info

from dsframe_multimodal import calibrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--modalities", nargs="+", default=["image", "audio", "text"], choices=list(calibrate.LEVELS))
    ap.add_argument("--target", type=float, default=0.6, help="val accuracy aimed at (default 0.6; chance is 0.1)")
    ap.add_argument("--seeds", type=int, default=2, help="probe seeds averaged per level")
    args = ap.parse_args()
    started = time.perf_counter()
    result = {"target_val_acc": args.target, "probe": "MLP(features -> 128 -> 10), 200 full-batch AdamW steps",
              "sweeps": {}, "chosen": {}}
    for m in args.modalities:
        rows = calibrate.sweep(m, seeds=tuple(range(args.seeds)))
        best = calibrate.choose(rows, args.target)
        result["sweeps"][m], result["chosen"][m] = rows, {best["key"]: best["level"], "val_acc": best["val_acc"]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = machine_info()
    write_json(args.out, result)
    lines = ["| modality | setting | level | probe val acc | chosen |", "|---|---|---|---|---|"]
    for m, rows in result["sweeps"].items():
        for r in rows:
            chosen = "**yes**" if result["chosen"][m][r["key"]] == r["level"] else ""
            lines.append(f"| {m} | {r['key']} | {r['level']} | {100 * r['val_acc']:.1f} % | {chosen} |")
    write_text(args.out.rsplit(".", 1)[0] + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
