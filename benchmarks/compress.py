"""Compression benchmark over seeds: the bert_compress student against its fp32 teacher and the
teacher through onnxruntime (fp32, same fusion; dynamic int8), one full recipe run per seed.

    python benchmarks/compress.py --out results/compress.json                  # 3 seeds (hours on 2 cores)
    python benchmarks/compress.py --out c.json --seeds 2 --override debug=tiny --skip-bert-base   # wiring
    python benchmarks/compress.py --recipe bert_base_compress --seeds 1 --skip-bert-base --skip-int8-paths \
        --out results/compress_bert_base.json      # BERT-base size (mpnet_base), ~1.5 h per seed

Each seed is one run of the real recipe (``python -m dsframe recipe=bert_compress seed=S``) in
``<runs-dir>/seed<S>``; a finished run is reused. Every choice inside a run is made on the
validation split; its evaluate stage reads the test split once and measures latency (median of
≥ 3 repetitions of the whole side-by-side measurement, fixed seq 128 and the test sentences at
their own lengths). This script only aggregates:

  rows      accuracy mean ± std over seeds; size (int8: also with every vocabulary row); latency
            median over all repetitions of all seeds, min and max beside
  teacher            the fine-tuned fp32 teacher, torch eager
  student            the int8 artifact (pruned + QAT + distilled, onnxruntime int8)
  teacher_ort_fp32   the teacher in onnxruntime fp32, fused like the student: student vs this row
                     is the compression's gain, this row vs teacher the runtime's
  baseline_ort_int8  the teacher dynamically quantized by onnxruntime (fused, stock embeddings)
  paired    exact McNemar of the student vs the teacher and vs baseline_ort_int8, per seed
  int8_paths, bert_base_shape   (seed 0's run) the QAT model through each int8 runtime; BERT-base
            shapes with random weights (size and latency only)
Writes FILE (JSON), FILE.md (tables) and FILE.png. Targets are reported with met: true/false.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TARGETS = {"size_ratio": (">=", 8.0), "speedup_b1_t1": (">=", 5.8), "acc_drop": ("<=", 1.2),
           "speedup_vs_ort_int8_b1_t1": (">=", 1.5), "acc_vs_ort_int8": (">=", 0.0)}
# evaluate-stage row -> benchmark row
ROWS = {"teacher": "teacher", "int8": "student", "teacher_ort_fp32": "teacher_ort_fp32",
        "teacher_ort_int8": "baseline_ort_int8"}


def run_recipe(run_dir: Path, overrides: list[str], recipe: str = "bert_compress") -> None:
    cmd = [sys.executable, "-m", "dsframe", f"recipe={recipe}", f"hydra.run.dir={run_dir}",
           "trainer.enable_progress_bar=false", *overrides]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def load_datamodule(run_dir: Path, split: str = "test"):
    from omegaconf import OmegaConf

    from dsframe import registry
    from dsframe.config.structured import to_dataclass

    cfg = OmegaConf.load(run_dir / "config.yaml")
    cls = registry.data.get(cfg.data.kind, key="data.kind")
    dm = cls(to_dataclass(cls.Config, cfg.data, "data"))
    dm.setup(split)
    return dm


def mean_std(xs: list[float]) -> dict:
    return {"mean": round(statistics.fmean(xs), 3), "std": round(statistics.stdev(xs), 3) if len(xs) > 1 else 0.0,
            "per_seed": xs}


def aggregate(evals: list[dict]) -> dict:
    """Rows over seeds from each seed's evaluate metrics."""
    rows = {}
    for src, name in ROWS.items():
        per = [e["models"][src] for e in evals if src in e["models"]]
        if len(per) != len(evals):
            continue
        keys = list(per[0]["latency_ms"])
        runs = {k: [x for r in per for x in r.get("latency_runs_ms", {}).get(k, [r["latency_ms"][k]])] for k in keys}
        rows[name] = {"runtime": per[0]["runtime"], "scheme": per[0].get("scheme"),
                      "acc": mean_std([r["acc"] for r in per]), "n": per[0]["n"],
                      "size_mb": round(statistics.fmean(r["size_mb"] for r in per), 3),
                      "latency_ms": {k: round(statistics.median(v), 3) for k, v in runs.items()},
                      "latency_min_ms": {k: round(min(v), 3) for k, v in runs.items()},
                      "latency_max_ms": {k: round(max(v), 3) for k, v in runs.items()},
                      "latency_repetitions": {k: len(v) for k, v in runs.items()}}
        if per[0].get("size_mb_full_vocab"):
            rows[name]["size_mb_full_vocab"] = round(statistics.fmean(r["size_mb_full_vocab"] for r in per), 3)
    return rows


def stacked(pairs: list[dict]) -> dict:
    """The per-seed McNemar splits added up (the seeds' models are judged on the same sentences,
    so this is a summary, not an independent test)."""
    import math

    a, b = sum(p["only_a_right"] for p in pairs), sum(p["only_b_right"] for p in pairs)
    n, k = a + b, min(a, b)
    pv = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"only_student_right": a, "only_other_right": b, "p_value": round(pv, 6)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--seeds", type=int, default=3, help="recipe runs, seeds 0..N-1 (default 3)")
    ap.add_argument("--runs-dir", help="where the runs live (default: next to --out, <stem>_runs)")
    ap.add_argument("--recipe", default="bert_compress",
                    help="bert_compress (MiniLM-L6) or bert_base_compress (BERT-base size, ~1.5 h per seed on 2 cores)")
    ap.add_argument("--override", action="append", default=[], help="Hydra override for every recipe run")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the int8_paths / bert_base_shape timing")
    ap.add_argument("--skip-bert-base", action="store_true")
    ap.add_argument("--skip-int8-paths", action="store_true")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: at least 1")

    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import onnxruntime

    from dsframe.io import write_json, write_text
    from dsframe.machine import machine_info

    out = Path(args.out)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out.parent / (out.stem + "_runs")
    started = time.time()
    evals, paired = [], []
    for seed in range(args.seeds):
        run_dir = (runs_dir / f"seed{seed}").resolve()
        if not (run_dir / "report.json").exists():
            run_recipe(run_dir, [*args.override, f"seed={seed}"], args.recipe)
        ev = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
        evals.append(ev)
        paired.append({"seed": seed, **{k.replace("int8_vs_", "student_vs_"): v for k, v in ev["paired"].items()}})
    rows = aggregate(evals)
    t, s, o, f = (rows[k] for k in ("teacher", "student", "baseline_ort_int8", "teacher_ort_fp32"))
    res = {"recipe": args.recipe, "runs_dir": str(runs_dir), "seeds": args.seeds, "overrides": args.override,
           "size_ratio": round(t["size_mb"] / s["size_mb"], 3),
           "size_ratio_full_vocab": round(t["size_mb"] / s["size_mb_full_vocab"], 3) if s.get("size_mb_full_vocab") else None,
           **{f"speedup_{k}": round(t["latency_ms"][k] / v, 3) for k, v in s["latency_ms"].items()},
           "acc_teacher": t["acc"]["mean"], "acc_student": s["acc"]["mean"],
           "acc_drop": round(t["acc"]["mean"] - s["acc"]["mean"], 3),
           "speedup_vs_ort_int8_b1_t1": round(o["latency_ms"]["b1_t1"] / s["latency_ms"]["b1_t1"], 3),
           "acc_vs_ort_int8": round(s["acc"]["mean"] - o["acc"]["mean"], 3),
           "speedup_split": {k: {"runtime": round(t["latency_ms"][k] / f["latency_ms"][k], 3),
                                 "compression": round(f["latency_ms"][k] / s["latency_ms"][k], 3)}
                             for k in s["latency_ms"]},
           "paired": paired,
           "paired_stacked": {k: stacked([p[k] for p in paired])
                              for k in paired[0] if k != "seed" and all(k in p for p in paired)},
           "rows": rows}
    seed0 = (runs_dir / "seed0").resolve()
    if not args.skip_int8_paths:
        print("int8 paths for the QAT student ...", flush=True)
        res["int8_paths"] = int8_paths(seed0, args.reps)
    if not args.skip_bert_base:
        print("bert_base_shape ...", flush=True)
        res["bert_base_shape"] = bert_base_shape(seed0, load_datamodule(seed0, "fit"), args.reps)
    res["targets"] = {k: {"target": f"{op} {v}", "value": res[k],
                          "met": bool(res[k] >= v if op == ">=" else res[k] <= v)} for k, (op, v) in TARGETS.items()}
    res["machine"] = {**machine_info(), "onnxruntime": onnxruntime.__version__,
                      "machines_of_the_runs": sorted({json.dumps(e.get("machine", {}).get("cpu_model")) for e in evals})}
    res["seconds_aggregating"] = round(time.time() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, res)
    write_text(out.with_suffix(".md"), markdown(res))
    plot(res, out.with_suffix(".png"))
    print(markdown(res))
    return 0


def int8_paths(run_dir: Path, reps: int) -> dict:
    """The QAT model through each int8 runtime at 1 thread (same weights; no vocabulary pruning)."""
    import copy

    from dsframe.models.files import load_model
    from dsframe_compress.int8 import export_int8, torch_dynamic_int8
    from dsframe_compress.measure import fixed_workload, measure_latency, medians, ort_runner, torch_runner

    qat = load_model(run_dir / "qat" / "model.pt").eval()
    vocab = qat.encoder.embeddings.word_embeddings.num_embeddings
    makers = {"torch_fp32": torch_runner(qat), "torch_ao_dynamic_int8": torch_runner(torch_dynamic_int8(qat))}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        tq = copy.deepcopy(qat)
        quantize_(tq, Int8DynamicActivationInt8WeightConfig())
        makers["torchao_int8_eager"] = torch_runner(tq)
    except Exception as exc:  # report, do not hide
        print(f"torchao int8 unavailable: {type(exc).__name__}: {exc}")
    qat_json = run_dir / "qat" / "qat.json"
    scheme = json.loads(qat_json.read_text())["scheme"] if qat_json.exists() else "auto"
    with tempfile.TemporaryDirectory() as qd:
        makers["onnxruntime_int8"] = ort_runner(export_int8(qat, qd, 128, scheme=scheme)["onnx_int8"])
        lat = measure_latency(makers, {f"b{b}": fixed_workload(b, 128, vocab) for b in (1, 8)}, (1,), max(3, reps))
    return {name: medians(v) for name, v in lat.items()}


def bert_base_shape(run_dir: Path, dm, reps: int) -> dict:
    """BERT-base shapes with random weights: the recipe's pruning amount (L1 only, no data), the
    same share of layers dropped (the last ones: random weights have no preference) and the same
    int8 export; size and latency only."""
    import torch
    from omegaconf import OmegaConf
    from transformers import BertConfig, BertModel

    from dsframe.models.files import read_model_file
    from dsframe.models.bert import BertClassifier
    from dsframe_compress.int8 import export_int8
    from dsframe_compress.measure import fixed_workload, measure_latency, medians, ort_runner, size_mb, torch_runner
    from dsframe_compress.stages import used_token_ids
    from dsframe_prune.plugin import PruneConfig, PrunePlugin

    cfg = OmegaConf.load(run_dir / "config.yaml")
    # the run's prune options; layers are dropped below by position (no data to score them)
    recipe = PruneConfig(**OmegaConf.to_container(OmegaConf.select(cfg, "plugins.prune", default={})))
    heads, ffn, dropped = recipe.heads, recipe.ffn, recipe.drop_layers
    teacher_layers = len(read_model_file(run_dir / "teacher" / "model.pt")["arch"]["heads"])
    torch.manual_seed(0)
    hf = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072)
    model = BertClassifier(BertModel(hf, add_pooling_layer=False), 2).eval()
    # one thread only: BERT-base at batch 8 takes seconds per call, and 2-thread figures on a
    # shared 2-core machine measure the neighbours more than the model
    with tempfile.TemporaryDirectory() as td:
        fp32 = Path(td) / "fp32.pt"
        torch.save(model.state_dict(), fp32)
        drop = round(12 * dropped / teacher_layers)
        res = {"params": sum(p.numel() for p in model.parameters()), "size_mb_fp32": round(size_mb(fp32), 2),
               "prune_amount": {"heads": heads, "ffn": ffn}, "layers_dropped": drop}
        import copy

        from dsframe_compress.structure import drop_layers

        pruned = copy.deepcopy(model)
        if drop:
            drop_layers(pruned, list(range(12 - drop)))
        p = PrunePlugin(PruneConfig(amount=recipe.amount, head_amount=heads, ffn_amount=ffn, taylor_weight=0.0))
        p.transform(pruned)
        p.finalize(pruned)
        keep, unk = used_token_ids(dm)
        info = export_int8(pruned, td, 128, keep_token_ids=keep, unk_id=unk)
        res["size_mb_int8"] = round(size_mb(info["onnx_int8"]), 2)
        lat = measure_latency({"fp32": torch_runner(model), "int8": ort_runner(info["onnx_int8"])},
                              {f"b{b}": fixed_workload(b, 128, 30522, calls=2) for b in (1, 8)}, (1,), max(3, reps))
        res["latency_ms_fp32"], res["latency_ms_int8"] = medians(lat["fp32"]), medians(lat["int8"])
        res["scheme"] = info["scheme"]
    res["size_ratio"] = round(res["size_mb_fp32"] / res["size_mb_int8"], 2)
    res["speedup"] = {k: round(res["latency_ms_fp32"][k] / v, 2) for k, v in res["latency_ms_int8"].items()}
    return res


def markdown(res: dict) -> str:
    rows = res["rows"]
    keys = list(rows["teacher"]["latency_ms"])
    m = res["machine"]
    lines = ["# Compression benchmark", "",
             f"Machine: {m['cpu_model']} ({m['arch']}, {m['cpus']} CPUs; flags {' '.join(m['cpu_flags'])}), "
             f"onnxruntime {m['onnxruntime']}, torch {m['torch']}, load average {m.get('load_avg_1m')} at the end "
             "(a shared machine: re-measure timings on a quiet one).", "",
             f"{res['seeds']} seeds of recipe={res['recipe']} (one recipe run each, `{res['runs_dir']}`, overrides {res['overrides']}). "
             "Accuracy on the test split: mean ± std over seeds. Latency: median ms over every repetition of "
             "every seed's side-by-side measurement (min–max); bK_tN = batch K, N threads, seq 128; test_bK_tN "
             "= test sentences at their own lengths.", "",
             "| row | runtime | acc % | size MB | " + " | ".join(keys) + " |", "|" + "---|" * (4 + len(keys))]
    for name, r in rows.items():
        size = f"{r['size_mb']:.2f}" + (f" ({r['size_mb_full_vocab']:.2f} all vocab)" if r.get("size_mb_full_vocab") else "")
        lines.append(f"| {name} | {r['runtime']}{', ' + r['scheme'] if r.get('scheme') else ''} | "
                     f"{r['acc']['mean']:.2f} ± {r['acc']['std']:.2f} | {size} | "
                     + " | ".join(f"{r['latency_ms'][k]:.1f} ({r['latency_min_ms'][k]:.1f}–{r['latency_max_ms'][k]:.1f})"
                                  for k in keys) + " |")
    lines += ["", "Student speedup over the teacher = runtime (torch → onnxruntime fp32) × compression "
                  "(onnxruntime fp32 → int8 student): "
              + ", ".join(f"{k} {res['speedup_' + k]:.2f}× = {v['runtime']:.2f} × {v['compression']:.2f}"
                          for k, v in res["speedup_split"].items()), ""]
    lines += ["| target | wanted | measured | met |", "|---|---|---|---|"]
    for k, t in res["targets"].items():
        lines.append(f"| {k} | {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "Exact McNemar on the test sentences (only the student right / only the other right, p):", ""]
    for p in res["paired"]:
        lines.append(f"- seed {p['seed']}: " + "; ".join(
            f"{k.replace('student_vs_', 'vs ')} {v['only_a_right']} / {v['only_b_right']}, p = {v['p_value']:.3g}"
            for k, v in p.items() if k != "seed"))
    for k, v in res.get("paired_stacked", {}).items():
        lines.append(f"- all seeds stacked, {k.replace('student_vs_', 'vs ')}: {v['only_student_right']} / "
                     f"{v['only_other_right']}, p = {v['p_value']:.3g} (same sentences each seed: a summary)")
    if "int8_paths" in res:
        lines += ["", "int8 paths (seed 0's QAT student, 1 thread, median ms): " + json.dumps(res["int8_paths"])]
    if "bert_base_shape" in res:
        b = res["bert_base_shape"]
        lines += ["", f"BERT-base shape (random init, {b.get('layers_dropped', 0)} of 12 layers dropped, "
                      f"{b['prune_amount']['heads']:.0%} of heads and {b['prune_amount']['ffn']:.0%} of FFN channels pruned, "
                      f"scheme {b.get('scheme')}): {b['size_mb_fp32']} MB fp32 → "
                      f"{b['size_mb_int8']} MB int8 ({b['size_ratio']}×), speedup {b['speedup']}"]
    return "\n".join(lines) + "\n"


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsframe.io import atomic_write

    rows = res["rows"]
    names = list(rows)
    keys = list(rows["teacher"]["latency_ms"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    a1.bar(names, [rows[n]["acc"]["mean"] for n in names], yerr=[rows[n]["acc"]["std"] for n in names], capsize=4)
    lo = min(rows[n]["acc"]["mean"] - 3 * rows[n]["acc"]["std"] - 1 for n in names)
    a1.set_ylim(max(0, lo), None)
    a1.set_ylabel(f"test accuracy %, mean ± std over {res['seeds']} seeds")
    a1.tick_params(axis="x", labelsize=8)
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        med = [rows[n]["latency_ms"][k] for k in keys]
        err = [[m - rows[n]["latency_min_ms"][k] for m, k in zip(med, keys)],
               [rows[n]["latency_max_ms"][k] - m for m, k in zip(med, keys)]]
        a2.bar([j + i * width for j in range(len(keys))], med, width, yerr=err, capsize=2, label=n)
    a2.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, fontsize=8)
    a2.set_yscale("log")
    a2.set_ylabel("latency ms: median (min–max)")
    a2.legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(f"bert_compress over {res['seeds']} seeds — {m['cpu_model']} ({' '.join(m['cpu_flags'])})", fontsize=9)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
