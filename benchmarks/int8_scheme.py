"""What the int8 weight scheme costs on this machine: one fp32 model exported as w8 (8-bit weights)
and w7 (7-bit, onnxruntime reduce_range), compared with the fp32 model on the VALIDATION split.

    python benchmarks/int8_scheme.py --run-dir outputs/bert_compress/<run> --out benchmarks/results/int8_scheme.json

For each scheme: validation accuracy, agreement with fp32 (share of sentences predicted the same),
largest |logit − fp32 logit|, file size, latency (median of 3 repetitions, min–max, 1 thread,
batch 1 and 8 at seq 128, and the validation sentences at their own lengths), side by side.
Post-training quantization of ``--source`` (default: the teacher), no QAT: the harsher case. On
a CPU without VNNI/AMX the w8 row shows onnxruntime's u8s8 saturation. Writes FILE and FILE.md.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a bert_compress run (for its data and model)")
    ap.add_argument("--source", default="teacher", help="stage whose model.pt is quantized")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from compress import load_datamodule

    from dsframe.io import write_json, write_text
    from dsframe.machine import machine_info
    from dsframe.models.files import load_model
    from dsframe_compress.int8 import OrtModel, export_int8
    from dsframe_compress.measure import (fixed_workload, measure_latency, medians, ort_runner,
                                          sentence_workload, size_mb)
    from dsframe_qat.scheme import choose_scheme, saturates

    run = Path(args.run_dir)
    dm = load_datamodule(run, "fit")
    model = load_model(run / args.source / "model.pt").eval()
    vocab = model.encoder.embeddings.word_embeddings.num_embeddings
    loader = dm.val_dataloader()
    with torch.no_grad():
        ref = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]) for b in loader]
    labels = torch.cat([b["labels"] for b in loader])
    ref_pred = torch.cat(ref).argmax(-1)
    res = {"run_dir": str(run), "source": args.source, "split": "val", "n": len(labels),
           "auto_here": choose_scheme(), "saturates_here": saturates(), "machine": machine_info(),
           "fp32_acc": round(100 * float((ref_pred == labels).float().mean()), 3), "schemes": {}}
    makers = {}
    with tempfile.TemporaryDirectory() as td:
        for scheme in ("w8", "w7"):
            path = export_int8(model, Path(td) / scheme, 128, int8_embeddings=False, scheme=scheme)["onnx_int8"]
            m = OrtModel(path)
            out = [m(b["input_ids"], b["attention_mask"]) for b in loader]
            pred = torch.cat(out).argmax(-1)
            res["schemes"][scheme] = {
                "acc": round(100 * float((pred == labels).float().mean()), 3),
                "agreement_with_fp32": round(100 * float((pred == ref_pred).float().mean()), 3),
                "max_abs_logit_diff": round(max(float((o - r).abs().max()) for o, r in zip(out, ref)), 4),
                "logit_scale": round(max(float(r.abs().max()) for r in ref), 3),
                "size_mb": round(size_mb(path), 3)}
            makers[scheme] = ort_runner(path)
            print(scheme, res["schemes"][scheme], flush=True)
        ids = dm.splits["val"].encodings["input_ids"]
        work = {"b1": fixed_workload(1, 128, vocab), "b8": fixed_workload(8, 128, vocab),
                "val_b1": sentence_workload(ids, 1, 128), "val_b8": sentence_workload(ids, 8, 128)}
        lat = measure_latency(makers, work, (1,), args.repeats)
    for scheme in makers:
        res["schemes"][scheme]["latency_ms"] = medians(lat[scheme])
        res["schemes"][scheme]["latency_min_max_ms"] = {k: [v["min_ms"], v["max_ms"]] for k, v in lat[scheme].items()}
    out = Path(args.out)
    write_json(out, res)
    write_text(out.with_suffix(".md"), markdown(res))
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    m = res["machine"]
    keys = list(res["schemes"]["w8"]["latency_ms"])
    lines = [f"# int8 weight scheme on {m['cpu_model']} ({' '.join(m['cpu_flags'])})", "",
             f"`{res['source']}` of `{res['run_dir']}`, post-training dynamic int8 (no QAT), validation split "
             f"({res['n']} sentences), fp32 accuracy {res['fp32_acc']:.2f} %. auto picks **{res['auto_here']}** here. "
             "Latency: median ms of the repetitions, 1 thread.", "",
             "| scheme | val acc % | agreement with fp32 % | max abs logit diff (logit scale) | MB | "
             + " | ".join(f"ms {k}" for k in keys) + " |", "|" + "---|" * (5 + len(keys))]
    for name, r in res["schemes"].items():
        lines.append(f"| {name} | {r['acc']:.2f} | {r['agreement_with_fp32']:.2f} | {r['max_abs_logit_diff']} "
                     f"({r['logit_scale']}) | {r['size_mb']:.2f} | "
                     + " | ".join(f"{r['latency_ms'][k]:.1f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
