"""A self-contained folder beside the int8 artifact: what a user needs to predict without dsframe.

``<export stage>/`` after ``compress_export`` with ``portable: true``:

    model_int8.onnx     the int8 model (onnxruntime alone runs it)
    model.pt2           the exported source model (``torch.export``: torch alone loads it)
    tokenizer/          the tokenizer's own files (``tokenizer.json`` is read by the ``tokenizers`` package)
    predict.json        what the script needs: max length, pad id, label names, file names
    predict.py          ``python predict.py "a sentence" ...`` (onnxruntime) or ``--runtime torch``

``predict.py`` imports onnxruntime (or torch), numpy and tokenizers, nothing of dsframe, so the
folder can be copied to a machine that has never seen dsframe.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from dsframe.errors import DsframeError

PREDICT_SCRIPT = Path(__file__).with_name("predict_template.py")


class _Logits(nn.Module):
    """The model called with positional tensors, returning the logits tensor (what torch.export needs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out if isinstance(out, torch.Tensor) else out["logits"]


def export_torch_program(model: nn.Module, path: Path, max_length: int) -> Path:
    """``torch.export`` of the model with dynamic batch and sequence length, saved atomically."""
    from torch.export import Dim

    model = _Logits(model).eval()
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=max(max_length, 3))
    example = (torch.ones(2, min(max_length, 16), dtype=torch.long), torch.ones(2, min(max_length, 16), dtype=torch.long))
    with torch.no_grad():
        try:
            program = torch.export.export(model, example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
        except Exception as exc:  # noqa: BLE001  (a model torch.export cannot trace: say which and why)
            raise DsframeError(f"torch.export of {type(model.model).__name__} failed ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); set the export stage's "
                               "option portable: false to skip the portable folder") from None
    tmp = path.with_name(f".tmp-{path.name}")  # torch.export.save wants the .pt2 suffix
    torch.export.save(program, str(tmp))
    os.replace(tmp, path)
    return path


def write_portable(out_dir: Path, model: nn.Module, tokenizer, max_length: int,
                   label_names: Optional[Sequence[str]], num_labels: int) -> dict:
    """Tokenizer files, ``model.pt2``, ``predict.json`` and ``predict.py`` in ``out_dir`` (which
    already holds ``model_int8.onnx``)."""
    from dsframe.io import write_json, write_text

    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise DsframeError("the portable folder needs the data module's fast (tokenizers-backed) tokenizer; "
                           "set the export stage's option portable: false to skip it")
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    export_torch_program(model, out_dir / "model.pt2", max_length)
    labels = list(label_names) if label_names else [str(i) for i in range(num_labels)]
    config = {"onnx": "model_int8.onnx", "torch": "model.pt2", "tokenizer": "tokenizer/tokenizer.json",
              "max_length": int(max_length), "pad_id": int(tokenizer.pad_token_id or 0), "labels": labels}
    write_json(out_dir / "predict.json", config)
    write_text(out_dir / "predict.py", PREDICT_SCRIPT.read_text())
    return {"portable": ["predict.py", "predict.json", "model.pt2", "tokenizer/"], "labels": labels}


def tokenizer_agrees(tokenizer, texts: Sequence[str], tokenizer_json: Path, max_length: int) -> bool:
    """The ``tokenizers`` file reproduces the data module's token ids (truncation included)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length)
    tok.no_padding()
    ours = [e.ids for e in tok.encode_batch(list(texts))]
    theirs = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return ours == [list(t) for t in theirs]
