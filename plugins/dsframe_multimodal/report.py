"""Stage functions of the multimodal_digits recipe (entry-point group ``dsframe.stages``).

    multimodal_seeds     retrains the recipe's fit stages under more seeds (run seed + 1 .. + extra),
                         each seed a nested run of the real Runner in ``<stage>/seed_<s>/``
    multimodal_evaluate  reads the test split ONCE (into memory), then for every seed: accuracy of
                         each unimodal baseline and each fused model, the fused models' accuracy with
                         every modality and pair of modalities absent, gate weights (mean and a few
                         samples), and the fusion layers' batch-1 CPU latency over the encoders'
    multimodal_report    report.json, report.md and PNGs in the run directory (mean ± std over seeds)

Validation accuracies are reported beside the test ones: every choice (noise levels, epochs,
fusion) was made on validation; the test numbers are read once, at the end.
"""
from __future__ import annotations

import itertools
import logging
import statistics
from pathlib import Path
from typing import Any, Optional

import torch

from dsframe.errors import ConfigError, DsframeError
from dsframe_multimodal.options import EvaluateOptions, ReportOptions, SeedsOptions

log = logging.getLogger("dsframe")

ARTICLE_GAIN = 17.3  # points over a single modality, the source article's claim


# -- more seeds ----------------------------------------------------------------------------------
def train_seeds(ctx) -> dict:
    """Rerun the fit stages with other seeds through the real Runner, one nested run per seed."""
    from omegaconf import OmegaConf

    from dsframe.config.schema import validate
    from dsframe.runner import Runner

    opt = ctx.options(SeedsOptions)
    names = list(ctx.cfg.recipe.stages.keys())
    before = names[:names.index(ctx.stage_name)]
    stages = opt.stages or [n for n in before if ctx.cfg.recipe.stages[n].get("run", "fit") == "fit"]
    for s in stages:
        if s not in before:
            raise ConfigError(f"recipe.stages.{ctx.stage_name}.options.stages", s,
                              f"an earlier fit stage: {', '.join(before)}")
    base_seed = int(ctx.cfg.get("seed", 42))
    seeds = [base_seed + i for i in range(1, opt.extra + 1)]
    results = {}
    for seed in seeds:
        cfg = OmegaConf.create(OmegaConf.to_container(ctx.cfg, resolve=True))
        cfg.seed = seed
        cfg.recipe.stages = {n: cfg.recipe.stages[n] for n in stages}
        runner = Runner(validate(cfg), ctx.stage_dir / f"seed_{seed}")
        runner._datamodule = ctx.datamodule  # the same splits for every seed
        log.info("stage %s: seed %d (%s)", ctx.stage_name, seed, ", ".join(stages))
        results[f"seed_{seed}"] = {n: m.get("fit", {}) for n, m in runner.run().items()}
    return {"seeds": [base_seed, *seeds], "stages": stages, "dirs": {str(s): f"{ctx.stage_name}/seed_{s}" for s in seeds},
            "fit": results}


# -- evaluate ---------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: torch.nn.Module, batches: list[dict], missing=()) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Predictions over the held batches with the ``missing`` modalities absent; and the gate [N, M]."""
    from dsframe.batch import call_model

    from dsframe_multimodal.data import without

    model.eval()
    preds, gates = [], []
    for batch in batches:
        b = without(batch, missing) if missing else batch
        preds.append(call_model(model, b).argmax(-1))
        gate = getattr(model, "last_gate", None)
        if gate is not None:
            gates.append(gate.detach().float())
    return torch.cat(preds), (torch.cat(gates) if len(gates) == len(batches) else None)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return round(100.0 * float((pred == labels).float().mean()), 3)


def missing_sets(modalities) -> list[tuple[str, ...]]:
    """Every non-empty proper subset of the modalities that can be absent (one and two at a time for three)."""
    return [c for r in range(1, len(modalities)) for c in itertools.combinations(modalities, r)]


def _load_split(dm, split: str) -> list[dict]:
    dm.setup("test")
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    return list(loader)


def evaluate(ctx) -> dict:
    """Accuracies (val and test), missing-modality accuracies, gate weights and fusion latency, per seed."""
    from dsframe.models.files import load_model

    from dsframe_multimodal.model import fusion_latency

    opt = ctx.options(EvaluateOptions)
    dm = ctx.datamodule
    dirs = {int(ctx.cfg.get("seed", 42)): ctx.run_dir}
    if opt.seeds_stage:
        seeds = ctx.results.get(opt.seeds_stage) or {}
        if "dirs" not in seeds:
            raise DsframeError(f"stage '{ctx.stage_name}' needs the results of stage '{opt.seeds_stage}' "
                               "(a multimodal_seeds stage); set options.seeds_stage: null to evaluate one seed")
        dirs.update({int(s): ctx.run_dir / d for s, d in seeds["dirs"].items()})
    val = _load_split(dm, "val")
    test = _load_split(dm, "test")  # read once; every model below is scored on these batches
    labels = {"val": torch.cat([b["labels"] for b in val]), "test": torch.cat([b["labels"] for b in test])}
    provided = tuple(dm.modalities)
    per_seed: dict[str, dict] = {}
    latency = None
    for seed, run_dir in dirs.items():
        row: dict[str, Any] = {"val": {}, "test": {}, "missing": {}, "gate": {}}
        for name in [*opt.baselines, *opt.fused]:
            path = run_dir / name / "model.pt"
            if not path.exists():
                raise DsframeError(f"stage '{ctx.stage_name}' needs {path} (stage '{name}', seed {seed})")
            model = load_model(path)
            row["val"][name] = accuracy(predict(model, val)[0], labels["val"])
            pred, gate = predict(model, test)
            row["test"][name] = accuracy(pred, labels["test"])
            if name not in opt.fused:
                continue
            used = tuple(m for m in getattr(model, "modalities", provided) if m in provided)
            row["missing"][name], gate_missing = {}, {}
            for miss in missing_sets(used):
                p, g = predict(model, test, miss)
                row["missing"][name]["+".join(miss)] = accuracy(p, labels["test"])
                if g is not None:
                    gate_missing["+".join(miss)] = [round(float(x), 4) for x in g.mean(0)]
            if gate is not None:
                row["gate"][name] = {"modalities": list(used), "mean": [round(float(x), 4) for x in gate.mean(0)],
                                     "by_missing": gate_missing}
            if name == opt.fused[0]:
                if gate is not None:
                    row["examples"] = _examples(dm, test, pred, gate, opt.examples)
                if latency is None:  # the run seed's model, timed once
                    one = {k: v[:1] for k, v in test[0].items()}
                    latency = fusion_latency(model, one, reps=opt.latency_reps, threads=opt.latency_threads)
        per_seed[str(seed)] = row
    return {"seeds": sorted(dirs), "modalities": list(provided), "baselines": opt.baselines, "fused": opt.fused,
            "n_test": int(labels["test"].numel()), "n_val": int(labels["val"].numel()),
            "per_seed": per_seed, "summary": summarise(per_seed, opt.baselines, opt.fused), "latency": latency,
            "data": getattr(dm, "info", {})}


def _examples(dm, test: list[dict], pred: torch.Tensor, gate: torch.Tensor, n: int) -> list[dict]:
    split = dm.splits["test"]
    out = []
    for i in range(min(n, int(test[0]["labels"].numel()))):
        row = split.rows[i]
        out.append({"label": int(test[0]["labels"][i]), "pred": int(pred[i]),
                    "text": split.words[row] if hasattr(split, "words") else None,
                    "gate": [round(float(g), 4) for g in gate[i]]})
    return out


def mean_std(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(per_seed: dict, baselines: list[str], fused: list[str]) -> dict:
    """Mean ± std over seeds; the gain of the first fused model over the best single modality
    (picked on validation), and the missing-modality check against the remaining baselines."""
    rows = list(per_seed.values())
    out: dict[str, Any] = {"test": {n: mean_std([r["test"][n] for r in rows]) for n in [*baselines, *fused]},
                           "val": {n: mean_std([r["val"][n] for r in rows]) for n in [*baselines, *fused]}}
    best = max(baselines, key=lambda n: out["val"][n]["mean"]) if baselines else None
    main = fused[0]
    out["missing"] = {f: {k: mean_std([r["missing"][f][k] for r in rows]) for k in rows[0]["missing"][f]}
                      for f in fused}
    if best is not None:
        gains = [r["test"][main] - r["test"][best] for r in rows]
        out.update(best_single=best, gain_over_best_single=mean_std(gains), article_gain=ARTICLE_GAIN)
        checks = {}
        for miss, acc in out["missing"][main].items():
            remaining = [b for b in baselines if b not in miss.split("+")]
            if remaining:
                ref = max(remaining, key=lambda n: out["test"][n]["mean"])
                checks[miss] = {"fused_missing": acc["mean"], "best_remaining": ref,
                                "best_remaining_acc": out["test"][ref]["mean"], "ok": acc["mean"] >= out["test"][ref]["mean"]}
        out["missing_vs_unimodal"] = checks
    if any(r["gate"].get(main) for r in rows):
        mods = rows[0]["gate"][main]["modalities"]
        out["gate_mean"] = {m: mean_std([r["gate"][main]["mean"][j] for r in rows]) for j, m in enumerate(mods)}
    return out


# -- report -------------------------------------------------------------------------------------
def report(ctx) -> dict:
    """report.json, report.md, report_accuracy.png, report_missing.png, report_gate.png in the run directory."""
    from dsframe.io import write_json, write_text
    from dsframe.machine import machine_info

    opt = ctx.options(ReportOptions)
    ev = ctx.results.get(opt.source)
    if not ev or "summary" not in ev:
        raise DsframeError(f"stage '{ctx.stage_name}' needs the results of stage '{opt.source}' (multimodal_evaluate)")
    rep = {"recipe": ctx.cfg.recipe.name, **ev, "machine": machine_info()}
    write_json(ctx.run_dir / "report.json", rep)
    write_text(ctx.run_dir / "report.md", render_markdown(rep))
    pngs = plot_report(rep, ctx.run_dir)
    s = rep["summary"]
    return {"report": str(ctx.run_dir / "report.json"), "pngs": [p.name for p in pngs],
            "acc_fused": s["test"][rep["fused"][0]]["mean"],
            "gain_over_best_single": s.get("gain_over_best_single", {}).get("mean")}


def _pm(x: dict) -> str:
    return f"{x['mean']:.2f} ± {x['std']:.2f}"


def render_markdown(rep: dict) -> str:
    s = rep["summary"]
    main = rep["fused"][0]
    lines = [f"# {rep['recipe']}: multimodal digits report", "",
             f"Seeds {rep['seeds']} (mean ± std over {len(rep['seeds'])}); test split: {rep['n_test']} samples, "
             f"read once; validation: {rep['n_val']} samples.", "",
             "## Accuracy (%)", "", "| model | val | test |", "|---|---|---|"]
    for name in [*rep["baselines"], *rep["fused"]]:
        lines.append(f"| {name} | {_pm(s['val'][name])} | {_pm(s['test'][name])} |")
    if "gain_over_best_single" in s:
        lines += ["", f"Gain of `{main}` over the best single modality (`{s['best_single']}`, chosen on validation): "
                      f"**{_pm(s['gain_over_best_single'])} points** (the article claims {s['article_gain']})."]
    lines += ["", "## Modalities missing at test time (accuracy %, absent for every test sample)", "",
              "| model | absent | accuracy | best unimodal of the rest | ≥ ? |", "|---|---|---|---|---|"]
    checks = s.get("missing_vs_unimodal", {})
    for f in rep["fused"]:
        for miss, acc in s["missing"][f].items():
            c = checks.get(miss) if f == main else None
            ref = f"{c['best_remaining']} {c['best_remaining_acc']:.2f}" if c else ""
            lines.append(f"| {f} | {miss} | {_pm(acc)} | {ref} | {('yes' if c['ok'] else 'NO') if c else ''} |")
    if "gate_mean" in s:
        lines += ["", f"## Gate weights of `{main}` (test, all modalities present)", "",
                  "| modality | mean α |", "|---|---|"]
        lines += [f"| {m} | {v['mean']:.3f} ± {v['std']:.3f} |" for m, v in s["gate_mean"].items()]
        first = rep["per_seed"][str(rep["seeds"][0])]
        if first.get("examples"):
            mods = first["gate"][main]["modalities"]
            lines += ["", f"Per sample (seed {rep['seeds'][0]}, first test samples):", "",
                      "| label | pred | text | " + " | ".join(f"α {m}" for m in mods) + " |",
                      "|---|---|---|" + "---|" * len(mods)]
            for e in first["examples"]:
                lines.append(f"| {e['label']} | {e['pred']} | `{e['text']}` | " + " | ".join(f"{g:.3f}" for g in e["gate"]) + " |")
    lat = rep.get("latency")
    if lat:
        lines += ["", f"## Latency (batch 1, CPU, {lat['threads']} thread, ms; median of {lat['reps']}, min–max)", "",
                  "| part | median | min | max |", "|---|---|---|---|"]
        lines += [f"| {p} | {lat[p]['median']:.3f} | {lat[p]['min']:.3f} | {lat[p]['max']:.3f} |"
                  for p in ("encoders", "fusion", "decoder", "forward")]
        lines += ["", "`fusion` = cross-modal attention + pooling + gate: what fusing adds over the encoders "
                      "(the article claims +9 ms)."]
    m = rep["machine"]
    lines += ["", f"Machine: {m['cpu_model']} ({m['cpus']} CPUs, load {m.get('load_avg_1m')}; "
                  f"{' '.join(m['cpu_flags'])}); timings on a shared machine vary.", ""]
    return "\n".join(lines)


def plot_report(rep: dict, run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsframe.io import atomic_write

    s, main, out = rep["summary"], rep["fused"][0], []

    def save(fig, name):
        path = run_dir / name
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        out.append(path)

    names = [*rep["baselines"], *rep["fused"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 4))
    means = [s["test"][n]["mean"] for n in names]
    ax.bar(names, means, yerr=[s["test"][n]["std"] for n in names], capsize=4,
           color=["#999"] * len(rep["baselines"]) + ["#2a7"] * len(rep["fused"]))
    for i, v in enumerate(means):
        ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"single modalities vs fused (mean ± std, {len(rep['seeds'])} seeds)")
    save(fig, "report_accuracy.png")

    miss = s["missing"][main]
    keys = ["none", *miss]
    vals = [s["test"][main]["mean"], *[miss[k]["mean"] for k in miss]]
    errs = [s["test"][main]["std"], *[miss[k]["std"] for k in miss]]
    fig, ax = plt.subplots(figsize=(1.1 * len(keys) + 2, 4))
    ax.bar(keys, vals, yerr=errs, capsize=4, color="#48c")
    for n in rep["baselines"]:
        ax.axhline(s["test"][n]["mean"], ls="--", lw=1, color="#888")
        ax.text(len(keys) - 0.5, s["test"][n]["mean"], f" {n} only", va="center", fontsize=7)
    ax.set_xlabel("absent at test time")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{main} with modalities missing")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    save(fig, "report_missing.png")

    if "gate_mean" in s:
        first = rep["per_seed"][str(rep["seeds"][0])]
        mods = list(s["gate_mean"])
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].bar(mods, [s["gate_mean"][m]["mean"] for m in mods], yerr=[s["gate_mean"][m]["std"] for m in mods],
                    capsize=4, color="#c84")
        axes[0].set_ylabel("mean gate weight α")
        axes[0].set_title("gate per modality (test)")
        ex = first.get("examples") or []
        if ex:
            grid = [[e["gate"][j] for j in range(len(mods))] for e in ex]
            im = axes[1].imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            axes[1].set_xticks(range(len(mods)), mods)
            axes[1].set_yticks(range(len(ex)), [f"{e['label']}→{e['pred']} {e['text'] or ''}" for e in ex], fontsize=7)
            axes[1].set_title("per sample (label→pred, text)")
            fig.colorbar(im, ax=axes[1])
        save(fig, "report_gate.png")
    return out

# each stage function declares its options; dsframe checks them when it validates the config
train_seeds.Config = SeedsOptions
evaluate.Config = EvaluateOptions
report.Config = ReportOptions
