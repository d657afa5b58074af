"""Predict with the compressed model of a dsframe bert_compress run, without dsframe.

    pip install onnxruntime tokenizers numpy        # (torch instead of onnxruntime for --runtime torch)
    python predict.py "a gripping, beautifully acted film" "ninety minutes of nothing"
    python predict.py --runtime torch --json "..."  # model.pt2 through torch.export.load

Reads predict.json, tokenizer/tokenizer.json and model_int8.onnx (or model.pt2) from the folder
this script lies in. Prints one line per sentence: label, probability, sentence (--json: a list of
{"text", "label", "probs", "logits"}).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def encode(texts, config):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(HERE / config["tokenizer"]))
    tok.enable_truncation(config["max_length"])
    tok.no_padding()  # a saved tokenizer.json may pad every row to a fixed length; rows are padded below
    rows = [e.ids for e in tok.encode_batch(list(texts))]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), config["pad_id"], dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def logits_onnx(ids, mask, config, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    session = ort.InferenceSession(str(HERE / config["onnx"]), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feed = {k: v for k, v in {"input_ids": ids, "attention_mask": mask}.items() if k in names}
    return session.run(None, feed)[0]


def logits_torch(ids, mask, config, threads):
    import torch

    torch.set_num_threads(threads)
    program = torch.export.load(str(HERE / config["torch"])).module()
    with torch.no_grad():
        return program(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("texts", nargs="*", help="sentences (none: one per line from standard input)")
    ap.add_argument("--runtime", choices=("onnx", "torch"), default="onnx")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = ap.parse_args(argv)
    texts = args.texts or [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        ap.error("no sentences: give them as arguments or on standard input")
    config = json.loads((HERE / "predict.json").read_text())
    ids, mask = encode(texts, config)
    run = logits_onnx if args.runtime == "onnx" else logits_torch
    logits = np.asarray(run(ids, mask, config, args.threads), dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = config["labels"]
    rows = [{"text": t, "label": labels[int(p.argmax())], "probs": p.round(6).tolist(), "logits": lg.tolist()}
            for t, p, lg in zip(texts, probs, logits)]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['label']}\t{max(r['probs']):.3f}\t{r['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
