"""What the int8 student's vocabulary pruning costs: one QAT model exported four ways, side by side.

    python benchmarks/vocab.py --run-dir outputs/bert_compress/<run> --out benchmarks/results/vocab.json

  all      every embedding row at int8 (no vocabulary pruning) — the reference
  pq       rows of tokens seen in training at int8, the others product-quantized (the default)
  nearest  only the seen rows; another id reads the kept row nearest its own embedding
  unk      only the seen rows; another id reads [UNK]'s row

For each: accuracy on the VALIDATION split (this is a design comparison: the test split is read
once, by the recipe's evaluate stage), agreement with `all` (share of validation sentences
predicted the same), file size. Writes FILE (JSON) and FILE with suffix .md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a bert_compress run with a finished qat stage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default="qat", help="stage whose model.pt is exported")
    args = ap.parse_args()

    from compress import load_datamodule

    from dsframe.io import write_json, write_text
    from dsframe.machine import machine_info
    from dsframe.models.files import load_model
    from dsframe_compress.int8 import OrtModel, export_int8
    from dsframe_compress.measure import accuracy, size_mb
    from dsframe_compress.stages import used_token_ids

    run = Path(args.run_dir)
    dm = load_datamodule(run, "fit")
    model = load_model(run / args.source / "model.pt").eval()
    keep, unk = used_token_ids(dm)
    val = dm.splits["val"].encodings["input_ids"]
    seen = set(keep.tolist())
    res = {"run_dir": str(run), "source": args.source, "split": "val", "rows_kept": int(keep.numel()),
           "vocab": int(model.encoder.embeddings.word_embeddings.num_embeddings),
           "val_sentences_with_unseen_tokens": sum(any(t not in seen for t in r) for r in val),
           "val_sentences": len(val), "machine": machine_info(), "variants": {}}
    qat_json = run / args.source / "qat.json"
    scheme = json.loads(qat_json.read_text())["scheme"] if qat_json.exists() else "auto"
    preds = {}
    with tempfile.TemporaryDirectory() as td:
        for name in ("all", "pq", "nearest", "unk"):
            t = time.time()
            kw = {} if name == "all" else {"keep_token_ids": keep, "unk_id": unk, "unseen": name}
            path = export_int8(model, Path(td) / name, 128, scheme=scheme, **kw)["onnx_int8"]
            acc = accuracy(OrtModel(path), dm.val_dataloader())
            preds[name] = acc["preds"]
            res["variants"][name] = {"acc": acc["acc"], "size_mb": round(size_mb(path), 3),
                                     "agreement_with_all": round(100.0 * float((acc["preds"] == preds["all"]).float().mean()), 2),
                                     "export_seconds": round(time.time() - t, 1)}
            print(name, res["variants"][name], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, res)
    m = res["machine"]
    lines = [f"# Vocabulary pruning of the int8 student (`{run}`, stage {args.source}, scheme {scheme})", "",
             f"Machine: {m['cpu_model']} ({' '.join(m['cpu_flags'])}). Compared on the validation split.", "",
             f"{res['rows_kept']} of {res['vocab']} rows seen in training; {res['val_sentences_with_unseen_tokens']} "
             f"of {res['val_sentences']} validation sentences hold another token.", "",
             "| variant | val acc % | agreement with all % | size MB |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['acc']:.2f} | {v['agreement_with_all']:.2f} | {v['size_mb']:.2f} |"
              for k, v in res["variants"].items()]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
