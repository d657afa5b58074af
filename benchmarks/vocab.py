"""What the int8 student's vocabulary pruning costs: one QAT model exported four ways, side by side.

    python benchmarks/vocab.py --run-dir outputs/bert_compress/<run> --out benchmarks/results/vocab.json

  all      every embedding row at int8 (no vocabulary pruning) — the reference
  pq       rows of tokens seen in training at int8, the others product-quantized (the default)
  nearest  only the seen rows; another id reads the kept row nearest its own embedding
  unk      only the seen rows; another id reads [UNK]'s row

For each: test accuracy, agreement with `all` (share of test sentences predicted the same),
file size. Writes FILE (JSON) and FILE with suffix .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE.parent, HERE.parent / "plugins", HERE):
    if str(p) not in sys.path:
        sys.path.insert(1, str(p))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a bert_compress run with a finished qat stage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default="qat", help="stage whose model.pt is exported")
    args = ap.parse_args()

    from compress import load_datamodule

    from dsframe.models import load_model
    from dsframe_compress.int8 import OrtModel, export_int8
    from dsframe_compress.measure import accuracy, size_mb
    from dsframe_compress.stages import used_token_ids

    run = Path(args.run_dir)
    dm = load_datamodule(run)
    model = load_model(run / args.source / "model.pt").eval()
    keep, unk = used_token_ids(dm)
    test = dm.splits["test"].encodings["input_ids"]
    seen = set(keep.tolist())
    res = {"run_dir": str(run), "source": args.source, "rows_kept": int(keep.numel()),
           "vocab": int(model.encoder.embeddings.word_embeddings.num_embeddings),
           "test_sentences_with_unseen_tokens": sum(any(t not in seen for t in r) for r in test),
           "test_sentences": len(test), "variants": {}}
    preds = {}
    with tempfile.TemporaryDirectory() as td:
        for name in ("all", "pq", "nearest", "unk"):
            t = time.time()
            kw = {} if name == "all" else {"keep_token_ids": keep, "unk_id": unk, "unseen": name}
            path = export_int8(model, Path(td) / name, 128, **kw)["onnx_int8"]
            acc = accuracy(OrtModel(path), dm.test_dataloader())
            preds[name] = acc["preds"]
            res["variants"][name] = {"acc": acc["acc"], "size_mb": round(size_mb(path), 3),
                                     "agreement_with_all": round(100.0 * float((acc["preds"] == preds["all"]).float().mean()), 2),
                                     "export_seconds": round(time.time() - t, 1)}
            print(name, res["variants"][name], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Vocabulary pruning of the int8 student (`{run}`, stage {args.source})", "",
             f"{res['rows_kept']} of {res['vocab']} rows seen in training; {res['test_sentences_with_unseen_tokens']} "
             f"of {res['test_sentences']} test sentences hold another token.", "",
             "| variant | test acc % | agreement with all % | size MB |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['acc']:.2f} | {v['agreement_with_all']:.2f} | {v['size_mb']:.2f} |"
              for k, v in res["variants"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
