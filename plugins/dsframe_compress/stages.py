"""Stage functions of the bert_compress recipe (entry-point group ``dsframe.stages``).

    compress_export    model.pt of a stage -> model.onnx (fp32) + model_int8.onnx (onnxruntime int8)
    compress_evaluate  accuracy on the test split (read once, here), file size, latency for every model
    compress_report    report.json, report.md and report.png in the run directory

Options come from ``recipe.stages.<name>.options``; every stage reads only finished
artifacts and writes only into its own directory (and the report files), atomically.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dsframe.errors import ConfigError, DsframeError
from dsframe_compress.options import EvaluateOptions, ExportOptions, ReportOptions

log = logging.getLogger("dsframe")


def _previous_fit_stage(ctx) -> str:
    stages = list(ctx.cfg.recipe.stages.keys())
    before = stages[:stages.index(ctx.stage_name)]
    for name in reversed(before):
        if (ctx.run_dir / name / "model.pt").exists():
            return name
    raise DsframeError(f"stage '{ctx.stage_name}' found no earlier stage with a model.pt")


# -- export --------------------------------------------------------------------------------
def export_scheme(requested: str, source_dir: Path, key: str) -> tuple[str, str]:
    """The scheme to export with and why. A QAT stage's ``qat.json`` names the grid its weights
    lie on: ``auto`` follows it, another explicit scheme is refused (the weights would be
    rounded a second time, onto a grid they were not trained for)."""
    from dsframe_qat.scheme import CHOICES, choose_scheme

    if requested not in CHOICES:
        raise ConfigError(key, requested, " | ".join(CHOICES))
    qat = source_dir / "qat.json"
    trained = json.loads(qat.read_text())["scheme"] if qat.exists() else None
    if trained is not None:
        if requested not in ("auto", trained):
            raise ConfigError(key, requested, f"auto or {trained}, the grid stage '{source_dir.name}' trained on "
                              f"({qat})")
        return trained, f"trained on by stage '{source_dir.name}' (qat.json)"
    if requested == "auto":
        return choose_scheme(), "chosen from this CPU's flags"
    return requested, "set in the options"


def export(ctx) -> dict:
    """Export a stage's model to ONNX and an onnxruntime int8 artifact (fused, per-channel int8)."""
    from dsframe.models.files import load_model
    from dsframe_compress.int8 import OrtModel, export_int8
    from dsframe_compress.measure import dummy_inputs, size_mb

    opt = ctx.options(ExportOptions)
    source = opt.source or _previous_fit_stage(ctx)
    scheme, why = export_scheme(opt.scheme, ctx.run_dir / source, f"recipe.stages.{ctx.stage_name}.options.scheme")
    model = load_model(ctx.artifact(source)).eval()
    keep, unk = (None, 100)
    if opt.vocab == "train":
        keep, unk = used_token_ids(ctx.datamodule)
    from dsframe.progress import progress

    # BERT-base size: about half a minute per step on 2 cores
    with progress(f"stage {ctx.stage_name}: export", 2 + (keep is not None) + opt.portable) as advance:
        info = export_int8(model, ctx.stage_dir, opt.seq_len, fuse=opt.fuse, int8_embeddings=opt.int8_embeddings,
                           keep_token_ids=keep, unk_id=unk, unseen=opt.unseen, scheme=scheme)
        advance()
        full_vocab_mb = None
        if keep is not None:  # the size without vocabulary pruning (which depends on the training corpus)
            import tempfile

            with tempfile.TemporaryDirectory() as td:
                full = export_int8(model, td, opt.seq_len, fuse=opt.fuse, int8_embeddings=opt.int8_embeddings,
                                   scheme=scheme)
                full_vocab_mb = round(size_mb(full["onnx_int8"]), 3)
            advance()
        vocab = _vocab(model)
        x = _val_batch(ctx.datamodule) or dummy_inputs(4, 32, vocab, seed=1)
        with torch.no_grad():
            ref = model(**x)
        out32 = OrtModel(info["onnx"])(**x)
        out8 = OrtModel(info["onnx_int8"])(**x)  # includes the effect of vocabulary pruning
        advance()
        portable = {}
        if opt.portable:
            from dsframe_compress.portable import write_portable

            dm = ctx.datamodule
            cfg = getattr(dm, "config", None)
            portable = write_portable(ctx.stage_dir, model, getattr(dm, "tokenizer", None),
                                      getattr(cfg, "max_length", opt.seq_len), getattr(dm, "label_names", None),
                                      int(ref.shape[-1]))
            advance()
    from dsframe.machine import machine_info
    from dsframe_qat.scheme import saturates

    return {**portable, "source": source, "scheme": scheme, "scheme_reason": why, "saturates_here": saturates(),
            "machine": machine_info(), "fused_ops": info.get("fused_ops", {}),
            "vocab_rows_kept": int(keep.numel()) if keep is not None else vocab,
            "onnx_mb": round(size_mb(info["onnx"]), 3), "onnx_int8_mb": round(size_mb(info["onnx_int8"]), 3),
            "onnx_int8_full_vocab_mb": full_vocab_mb,
            "max_abs_diff_fp32": float((out32 - ref).abs().max()),
            "max_abs_diff_int8": float((out8 - ref).abs().max()),
            "argmax_agreement_int8": round(100.0 * float((out8.argmax(-1) == ref.argmax(-1)).float().mean()), 2),
            "check_batch": int(ref.shape[0])}


def _val_batch(dm) -> dict | None:
    """The first validation batch (input ids and mask), or None without a data module. (The test
    split is read once, by the evaluate stage.)"""
    if dm is None:
        return None
    try:
        dm.setup("fit")
        batch = next(iter(dm.val_dataloader()))
    except Exception:  # a data module without a validation split: fall back to random ids
        return None
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def used_token_ids(dm) -> tuple[torch.Tensor, int]:
    """Token ids of the training split plus the tokenizer's special tokens, and the [UNK] id."""
    if "train" not in getattr(dm, "splits", {}):
        dm.setup("fit")
    ids = {i for row in dm.splits["train"].encodings["input_ids"] for i in row}
    tok = getattr(dm, "tokenizer", None)
    specials = set(getattr(tok, "all_special_ids", []) or [])
    unk = getattr(tok, "unk_token_id", None)
    unk = 100 if unk is None else int(unk)
    return torch.tensor(sorted(ids | specials | {unk})), unk


def _vocab(model) -> int:
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            return m.num_embeddings
    return 30522


# -- evaluate ------------------------------------------------------------------------------
def evaluate(ctx) -> dict:
    """Test accuracy (the only read of the test split), file size and latency of each stage's
    model, the int8 artifact and the baseline through other runtimes; McNemar of the student."""
    from dsframe.io import write_json
    from dsframe.machine import machine_info
    from dsframe.models.files import load_model
    from dsframe_compress.int8 import OrtModel, export_fp32_fused, export_int8
    from dsframe_compress.measure import (accuracy, fixed_workload, mcnemar, measure_latency, medians,
                                          ort_runner, sentence_workload, size_mb, torch_runner)

    opt = ctx.options(EvaluateOptions)
    dm = ctx.datamodule
    dm.setup("test")
    loader = dm.test_dataloader()
    rows: dict[str, dict] = {}
    makers: dict = {}
    preds: dict = {}
    vocab = 30522

    def add(name, runtime, model, path, maker, **extra):
        acc = accuracy(model, loader, autocast_bf16=extra.pop("bf16", False), limit_batches=opt.limit_test_batches)
        preds[name] = acc.pop("preds")
        log.info("evaluate %s: acc %.2f", name, acc["acc"])
        rows[name] = {"runtime": runtime, "file": str(path), "size_mb": round(size_mb(path), 3), **acc, **extra}
        makers[name] = maker

    for name in opt.stages:
        path = ctx.artifact(name)
        model = load_model(path).eval()
        vocab = _vocab(model)
        add(name, "torch fp32", model, path, torch_runner(model), params=sum(p.numel() for p in model.parameters()))
    if opt.int8:
        path = ctx.artifact(opt.int8, "model_int8.onnx")
        exp = json.loads(f.read_text()) if (f := ctx.run_dir / opt.int8 / "metrics.json").exists() else {}
        m8 = OrtModel(path, threads=max(opt.threads))
        add("int8", "onnxruntime int8", m8, path, ort_runner(path), scheme=m8.metadata.get("int8_scheme"),
            size_mb_full_vocab=exp.get("onnx_int8_full_vocab_mb"))
    base_path = ctx.artifact(opt.baseline)
    base_model = load_model(base_path).eval()
    name = opt.baseline
    if "ort_fp32" in opt.baselines:
        p = export_fp32_fused(base_model, ctx.stage_dir / f"{name}_fp32_fused.onnx", opt.seq_len)
        add(f"{name}_ort_fp32", "onnxruntime fp32 (fused like the student)", OrtModel(p, max(opt.threads)), p,
            ort_runner(p))
    if "ort_int8" in opt.baselines:
        p = Path(export_int8(base_model, ctx.stage_dir / f"{name}_ort_int8", opt.seq_len, fuse=True,
                             int8_embeddings=False)["onnx_int8"])
        m8 = OrtModel(p, max(opt.threads))
        add(f"{name}_ort_int8", "onnxruntime dynamic int8 (fused, stock embeddings)", m8, p, ort_runner(p),
            scheme=m8.metadata.get("int8_scheme"))
    if "bf16" in opt.baselines:
        add(f"{name}_bf16", "torch bf16 autocast", base_model, base_path, torch_runner(base_model, autocast_bf16=True),
            bf16=True)

    labels = _labels(loader, opt.limit_test_batches)
    write_json(ctx.stage_dir / "test_preds.json", {"labels": labels.tolist(),
                                                   "preds": {k: v.tolist() for k, v in preds.items()}})
    paired = {}
    if "int8" in preds:
        for other in (opt.baseline, f"{opt.baseline}_ort_int8"):
            if other in preds:
                paired[f"int8_vs_{other}"] = mcnemar(preds["int8"], preds[other], labels)

    workloads = {f"b{b}": fixed_workload(b, opt.seq_len, vocab, opt.calls) for b in opt.batches}
    if opt.sentences != 0:
        ids = dm.splits["test"].encodings["input_ids"]
        pad = getattr(getattr(dm, "tokenizer", None), "pad_token_id", None) or 0
        workloads.update({f"test_b{b}": sentence_workload(ids, b, opt.sentences, pad) for b in opt.batches})
    log.info("evaluate: latency of %d models, %s, %d repetitions", len(makers), list(workloads), opt.repeats)
    from dsframe.progress import progress

    steps = len(opt.threads) * opt.repeats * len(workloads) * len(makers)
    with progress(f"stage {ctx.stage_name}: latency", steps) as advance:
        lat = measure_latency(makers, workloads, opt.threads, opt.repeats, advance=advance)
    base = rows[opt.baseline]
    base["latency_ms"] = medians(lat[opt.baseline])
    for name, row in rows.items():
        row["latency_ms"] = medians(lat[name])
        row["latency_min_ms"] = {k: v["min_ms"] for k, v in lat[name].items()}
        row["latency_max_ms"] = {k: v["max_ms"] for k, v in lat[name].items()}
        row["latency_runs_ms"] = {k: v["runs_ms"] for k, v in lat[name].items()}
        row["size_ratio"] = round(base["size_mb"] / row["size_mb"], 3)
        row["speedup"] = {k: round(base["latency_ms"][k] / v, 3) for k, v in row["latency_ms"].items()}
        row["acc_drop"] = round(base["acc"] - row["acc"], 3)
    out = {"baseline": opt.baseline, "seq_len": opt.seq_len, "sentences_timed": opt.sentences,
           "latency_repeats": opt.repeats, "models": rows, "paired": paired,
           "torch_threads_default": torch.get_num_threads(), "machine": machine_info()}
    ortfp = rows.get(f"{opt.baseline}_ort_fp32")
    if ortfp and "int8" in rows:  # total speedup = runtime (torch → onnxruntime) × compression
        out["speedup_split"] = {k: {"total": rows["int8"]["speedup"][k],
                                    "runtime": round(base["latency_ms"][k] / ortfp["latency_ms"][k], 3),
                                    "compression": round(ortfp["latency_ms"][k] / rows["int8"]["latency_ms"][k], 3)}
                                for k in base["latency_ms"]}
    return out


def _labels(loader, limit_batches=None) -> torch.Tensor:
    return torch.cat([b["labels"] for i, b in enumerate(loader) if limit_batches is None or i < limit_batches])


# -- report --------------------------------------------------------------------------------
def report(ctx) -> dict:
    """Write report.json, report.md and report.png for the compression run."""
    from dsframe.io import write_json, write_text
    from dsframe.machine import machine_info

    opt = ctx.options(ReportOptions)
    src = ctx.run_dir / opt.source / "metrics.json"
    if opt.source in (ctx.results or {}):
        ev = ctx.results[opt.source]
    elif src.exists():
        ev = json.loads(src.read_text())
    else:
        raise DsframeError(f"stage '{ctx.stage_name}' needs the metrics of stage '{opt.source}' ({src})")
    stages = {}
    for name in ctx.cfg.recipe.stages:
        f = ctx.run_dir / name / "metrics.json"
        if f.exists() and name != opt.source:
            stages[name] = json.loads(f.read_text())
    rep = {"recipe": ctx.cfg.recipe.name, "baseline": ev["baseline"], "seq_len": ev["seq_len"],
           "sentences_timed": ev.get("sentences_timed"), "latency_repeats": ev.get("latency_repeats"),
           "models": ev["models"], "paired": ev.get("paired", {}), "speedup_split": ev.get("speedup_split"),
           "stages": stages, "machine": ev.get("machine") or machine_info()}
    write_json(ctx.run_dir / "report.json", rep)
    write_text(ctx.run_dir / "report.md", render_markdown(rep))
    plot_report(rep, ctx.run_dir / "report.png")
    final = ev["models"].get("int8") or list(ev["models"].values())[-1]
    return {"report": str(ctx.run_dir / "report.md"), "final_acc": final["acc"],
            "final_size_ratio": final["size_ratio"], "final_speedup": final["speedup"]}


def _cell(r: dict, k: str) -> str:
    lo, hi = r.get("latency_min_ms", {}).get(k), r.get("latency_max_ms", {}).get(k)
    med = f"{r['latency_ms'][k]:.1f}"
    return med if lo is None else f"{med} ({lo:.1f}–{hi:.1f})"


def render_markdown(rep: dict) -> str:
    models = rep["models"]
    keys = list(next(iter(models.values()))["latency_ms"])
    m = rep.get("machine") or {}
    lines = [f"# {rep['recipe']} report", "",
             f"Machine: {m.get('cpu_model', '?')} ({m.get('arch', '?')}, {m.get('cpus', '?')} CPUs; flags: "
             f"{' '.join(m.get('cpu_flags', [])) or 'none of the listed'}), load average {m.get('load_avg_1m')}, "
             f"torch {m.get('torch', '?')}. Timings on a shared machine: re-measure on a quiet one.", "",
             f"Baseline: `{rep['baseline']}` (torch fp32). Accuracy: the test split (read once, by the evaluate "
             f"stage). Latency: median ms over {rep.get('latency_repeats', '?')} repetitions of the whole "
             f"measurement (min–max beside); bK_tN = batch K, N threads at sequence length {rep['seq_len']}; "
             f"test_bK_tN = {rep.get('sentences_timed') or 'all'} test sentences at their own lengths.", "",
             "| model | runtime | test acc % | acc drop (pts) | size MB | size ratio | " + " | ".join(keys) + " |",
             "|" + "---|" * (6 + len(keys))]
    for name, r in models.items():
        size = f"{r['size_mb']:.2f}"
        if r.get("size_mb_full_vocab"):
            size += f" ({r['size_mb_full_vocab']:.2f} all vocab)"
        lines.append("| " + " | ".join([name, r["runtime"] + (f", {r['scheme']}" if r.get("scheme") else ""),
                                        f"{r['acc']:.2f}", f"{r['acc_drop']:+.2f}", size, f"{r['size_ratio']:.2f}×",
                                        *[_cell(r, k) for k in keys]]) + " |")
    lines += ["", "Speedup against the baseline (medians):", "",
              "| model | " + " | ".join(keys) + " |", "|" + "---|" * (1 + len(keys))]
    for name, r in models.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['speedup'][k]:.2f}×" for k in keys) + " |")
    if rep.get("speedup_split"):
        lines += ["", "int8 student vs baseline = runtime (torch → onnxruntime fp32, same fusion) × compression "
                      "(onnxruntime fp32 → pruned int8 student): " +
                  ", ".join(f"{k} {v['total']:.2f}× = {v['runtime']:.2f} × {v['compression']:.2f}"
                            for k, v in rep["speedup_split"].items())]
    for pair, t in rep.get("paired", {}).items():
        a, b = pair.split("_vs_")
        lines.append(f"- exact McNemar, {a} vs {b}: only {a} right on {t['only_a_right']}, only {b} on "
                     f"{t['only_b_right']} of {t['n']} (p = {t['p_value']:.3g})")
    lines.append("")
    for name, s in rep.get("stages", {}).items():
        if "params" in s:
            val = s.get("fit", {}).get("val/acc")
            lines.append(f"- stage `{name}`: {s['params']:,} parameters, model file {s.get('model_mb', '?')} MB, "
                         f"val acc {'?' if val is None else f'{100 * val:.2f} %'}, {s.get('seconds', '?')} s")
        elif "onnx_int8_mb" in s:
            lines.append(f"- stage `{name}`: scheme {s.get('scheme', '?')} ({s.get('scheme_reason', '')}), ONNX fp32 "
                         f"{s['onnx_mb']} MB, int8 {s['onnx_int8_mb']} MB ({s.get('onnx_int8_full_vocab_mb')} MB with "
                         f"every vocabulary row), fused {s.get('fused_ops')}, max |Δlogit| int8 vs torch "
                         f"{s['max_abs_diff_int8']:.4f}, argmax agreement {s.get('argmax_agreement_int8', '?')} % on "
                         "a validation batch")
    return "\n".join(lines) + "\n"


def plot_report(rep: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsframe.io import atomic_write

    models = rep["models"]
    names = list(models)
    keys = list(next(iter(models.values()))["latency_ms"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(keys))
    for i, k in enumerate(keys):
        a1.bar([j + i * width for j in range(len(names))], [models[n]["latency_ms"][k] for n in names],
               width, label=k)
    a1.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    a1.set_ylabel(f"median latency, ms (seq {rep['seq_len']})")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3, axis="y")
    for n in names:
        a2.scatter(models[n]["size_mb"], models[n]["acc"], s=60)
        a2.annotate(f"{n} ({models[n]['speedup'][keys[0]]:.1f}× {keys[0]})",
                    (models[n]["size_mb"], models[n]["acc"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    a2.set_xlabel("file size, MB")
    a2.set_ylabel("test accuracy, %")
    a2.grid(alpha=0.3)
    m = rep.get("machine") or {}
    fig.suptitle(f"{rep['recipe']}: size, latency and accuracy against {rep['baseline']} — "
                 f"{m.get('cpu_model', '?')} ({' '.join(m.get('cpu_flags', []))})", fontsize=9)
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)

# each stage function declares its options; dsframe checks them when it validates the config
export.Config = ExportOptions
evaluate.Config = EvaluateOptions
report.Config = ReportOptions
