"""Stage functions of the bert_compress recipe (entry-point group ``dsframe.stages``).

    compress_export    model.pt of a stage -> model.onnx (fp32) + model_int8.onnx (onnxruntime int8)
    compress_evaluate  accuracy on the test split, file size, latency medians for every model
    compress_report    report.json, report.md and report.png in the run directory

Options come from ``recipe.stages.<name>.options``; every stage reads only finished
artifacts and writes only into its own directory (and the report files), atomically.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch

from dsframe.errors import ConfigError, DsframeError

log = logging.getLogger("dsframe")


def _options(cls, ctx) -> Any:
    raw = dict(getattr(ctx.stage, "options", None) or {})
    names = {f for f in cls.__dataclass_fields__}
    for k in raw:
        if k not in names:
            raise ConfigError(f"recipe.stages.{ctx.stage_name}.options.{k}", raw[k],
                              f"one of {', '.join(sorted(names))}")
    return cls(**raw)


def _previous_fit_stage(ctx) -> str:
    stages = list(ctx.cfg.recipe.stages.keys())
    before = stages[:stages.index(ctx.stage_name)]
    for name in reversed(before):
        if (ctx.run_dir / name / "model.pt").exists():
            return name
    raise DsframeError(f"stage '{ctx.stage_name}' found no earlier stage with a model.pt")


# -- export --------------------------------------------------------------------------------

@dataclass
class ExportOptions:
    source: Optional[str] = None  # stage whose model.pt is exported (null: the last fit stage)
    seq_len: int = 128
    fuse: bool = True             # onnxruntime BERT fusion (attention, gelu, layer norm)
    int8_embeddings: bool = True  # word embeddings as int8 rows + per-row scale
    vocab: str = "train"          # int8 artifact keeps embedding rows of: train (ids in the
                                  # training split + special tokens) | all
    unseen: str = "pq"            # with vocab=train, rows of the other tokens: product-quantized,
                                  # 96 bytes per 384-wide row (pq) | dropped, the id reads the
                                  # kept row nearest its embedding (nearest) or [UNK]'s (unk)


def export(ctx) -> dict:
    """Export a stage's model to ONNX and an onnxruntime int8 artifact (fused, per-channel int8)."""
    from dsframe.models import load_model
    from dsframe_compress.int8 import UNSEEN, OrtModel, export_int8
    from dsframe_compress.measure import dummy_inputs, size_mb

    opt = _options(ExportOptions, ctx)
    if opt.vocab not in ("train", "all"):
        raise ConfigError(f"recipe.stages.{ctx.stage_name}.options.vocab", opt.vocab, "train or all")
    if opt.unseen not in UNSEEN:
        raise ConfigError(f"recipe.stages.{ctx.stage_name}.options.unseen", opt.unseen, " | ".join(UNSEEN))
    source = opt.source or _previous_fit_stage(ctx)
    model = load_model(ctx.artifact(source)).eval()
    keep, unk = (None, 100)
    if opt.vocab == "train":
        keep, unk = used_token_ids(ctx.datamodule)
    info = export_int8(model, ctx.stage_dir, opt.seq_len, fuse=opt.fuse, int8_embeddings=opt.int8_embeddings,
                       keep_token_ids=keep, unk_id=unk, unseen=opt.unseen)
    vocab = _vocab(model)
    x = _test_batch(ctx.datamodule) or dummy_inputs(4, 32, vocab, seed=1)
    with torch.no_grad():
        ref = model(**x)
    out32 = OrtModel(info["onnx"])(**x)
    out8 = OrtModel(info["onnx_int8"])(**x)  # includes the effect of vocabulary pruning
    return {"source": source, "fused_ops": info.get("fused_ops", {}),
            "vocab_rows_kept": int(keep.numel()) if keep is not None else vocab,
            "onnx_mb": round(size_mb(info["onnx"]), 3), "onnx_int8_mb": round(size_mb(info["onnx_int8"]), 3),
            "max_abs_diff_fp32": float((out32 - ref).abs().max()),
            "max_abs_diff_int8": float((out8 - ref).abs().max()),
            "argmax_agreement_int8": round(100.0 * float((out8.argmax(-1) == ref.argmax(-1)).float().mean()), 2),
            "check_batch": int(ref.shape[0])}


def _test_batch(dm) -> dict | None:
    """The first test batch (input ids and mask), or None without a data module."""
    if dm is None:
        return None
    try:
        dm.setup("test")
        batch = next(iter(dm.test_dataloader()))
    except Exception:  # a data module without a test split: fall back to random ids
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

@dataclass
class EvaluateOptions:
    stages: List[str] = field(default_factory=lambda: ["teacher", "prune", "qat"])  # torch fp32 models
    int8: Optional[str] = "export"  # stage holding model_int8.onnx (null: none)
    baseline: str = "teacher"       # speedup and size ratio are against this stage
    batches: List[int] = field(default_factory=lambda: [1, 8])
    threads: List[int] = field(default_factory=lambda: [1, 2])
    seq_len: int = 128
    reps: int = 10
    limit_test_batches: Optional[int] = None


def evaluate(ctx) -> dict:
    """Test accuracy, file size and latency medians of each stage's model and the int8 artifact."""
    from dsframe.models import load_model
    from dsframe_compress.int8 import OrtModel
    from dsframe_compress.measure import accuracy, latency_grid, ort_runner, size_mb, torch_runner

    opt = _options(EvaluateOptions, ctx)
    if opt.baseline not in opt.stages:
        raise ConfigError(f"recipe.stages.{ctx.stage_name}.options.baseline", opt.baseline,
                          f"one of the evaluated stages {opt.stages}")
    dm = ctx.datamodule
    dm.setup("test")
    loader = dm.test_dataloader()
    rows: dict[str, dict] = {}
    vocab = 30522
    grid = dict(batches=opt.batches, threads=opt.threads, seq=opt.seq_len, reps=opt.reps)
    preds = {}
    for name in opt.stages:
        path = ctx.artifact(name)
        model = load_model(path).eval()
        vocab = _vocab(model)
        acc = accuracy(model, loader, limit_batches=opt.limit_test_batches)
        preds[name] = acc.pop("preds")
        log.info("evaluate %s: acc %.2f", name, acc["acc"])
        rows[name] = {"runtime": "torch fp32", "file": str(path), "size_mb": round(size_mb(path), 3),
                      "params": sum(p.numel() for p in model.parameters()), **acc,
                      "latency_ms": latency_grid(torch_runner(model), vocab, **grid)}
    if opt.int8:
        path = ctx.artifact(opt.int8, "model_int8.onnx")
        acc = accuracy(OrtModel(path, threads=max(opt.threads)), loader, limit_batches=opt.limit_test_batches)
        preds["int8"] = acc.pop("preds")
        rows["int8"] = {"runtime": "onnxruntime int8", "file": str(path), "size_mb": round(size_mb(path), 3), **acc,
                        "latency_ms": latency_grid(ort_runner(path), vocab, **grid)}
        last_fp = opt.stages[-1]
        rows["int8"]["agreement_with_" + last_fp] = round(
            100.0 * float((preds["int8"] == preds[last_fp]).float().mean()), 3)
    base = rows[opt.baseline]
    for name, row in rows.items():
        row["size_ratio"] = round(base["size_mb"] / row["size_mb"], 3)
        row["speedup"] = {k: round(base["latency_ms"][k] / v, 3) for k, v in row["latency_ms"].items()}
        row["acc_drop"] = round(base["acc"] - row["acc"], 3)
    import os

    return {"baseline": opt.baseline, "seq_len": opt.seq_len, "models": rows,
            "torch_threads_default": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


# -- report --------------------------------------------------------------------------------

@dataclass
class ReportOptions:
    source: str = "evaluate"  # the evaluate stage whose metrics are reported


def report(ctx) -> dict:
    """Write report.json, report.md and report.png for the compression run."""
    from dsframe.io import write_json, write_text

    opt = _options(ReportOptions, ctx)
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
           "models": ev["models"], "stages": stages, "cpus": ev.get("cpus"), "load_avg_1m": ev.get("load_avg_1m")}
    write_json(ctx.run_dir / "report.json", rep)
    write_text(ctx.run_dir / "report.md", render_markdown(rep))
    plot_report(rep, ctx.run_dir / "report.png")
    final = ev["models"].get("int8") or list(ev["models"].values())[-1]
    return {"report": str(ctx.run_dir / "report.md"), "final_acc": final["acc"],
            "final_size_ratio": final["size_ratio"], "final_speedup": final["speedup"]}


def render_markdown(rep: dict) -> str:
    models = rep["models"]
    keys = list(next(iter(models.values()))["latency_ms"])
    head = ["model", "runtime", "test acc %", "acc drop (pts)", "size MB", "size ratio",
            *[f"ms {k}" for k in keys], *[f"speedup {k}" for k in keys]]
    lines = [f"# {rep['recipe']} report", "",
             f"Baseline: `{rep['baseline']}` (fp32). Latency: median ms at sequence length {rep['seq_len']}, "
             f"batch b, t threads (bK_tN); load average after measuring: {rep.get('load_avg_1m')} on "
             f"{rep.get('cpus')} CPUs (other processes slow the 2-thread figures most).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in models.items():
        cells = [name, r["runtime"], f"{r['acc']:.2f}", f"{r['acc_drop']:+.2f}", f"{r['size_mb']:.2f}",
                 f"{r['size_ratio']:.2f}×", *[f"{r['latency_ms'][k]:.1f}" for k in keys],
                 *[f"{r['speedup'][k]:.2f}×" for k in keys]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, m in rep.get("stages", {}).items():
        if "params" in m:
            lines.append(f"- stage `{name}`: {m['params']:,} parameters, model file {m.get('model_mb', '?')} MB, "
                         f"test acc {100 * m.get('test', {}).get('test/acc', float('nan')):.2f} %, "
                         f"{m.get('seconds', '?')} s")
        elif "onnx_int8_mb" in m:
            lines.append(f"- stage `{name}`: ONNX fp32 {m['onnx_mb']} MB, int8 {m['onnx_int8_mb']} MB, fused "
                         f"{m.get('fused_ops')}, max |Δlogit| int8 vs torch {m['max_abs_diff_int8']:.4f}, "
                         f"argmax agreement {m.get('argmax_agreement_int8', '?')} % on a test batch")
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
    fig.suptitle(f"{rep['recipe']}: size, latency and accuracy against {rep['baseline']}")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
