"""Real int8 models for CPU inference: ONNX export, onnxruntime fusion + dynamic int8, and the
torch dynamic-int8 path, plus a wrapper that makes an ONNX session look like a model.

The fastest CPU path measured here is onnxruntime (fused BERT attention, MatMulInteger with
per-channel symmetric int8 weights; 7-bit weights — scheme ``w7`` — where its u8s8 kernels would
saturate, see ``dsframe_qat.scheme``). The int8 file records its scheme and the machine it was
built on in its ONNX metadata; ``OrtModel`` warns once when it would saturate on this CPU. Word embeddings are stored as an int8 table with one
fp32 scale per row (``Int8RowEmbedding``) — the per-row grid QAT trained on — instead of
onnxruntime's per-tensor Gather quantization.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsframe_compress.options import UNSEEN

INPUTS = ("input_ids", "attention_mask")
META_PREFIX = "dsframe."


class Int8RowEmbedding(nn.Module):
    """An embedding table held as int8 with a per-row scale: weight ≈ q * scale.

    With ``keep_ids`` only those rows are stored at int8 (vocabulary pruning); a lookup table
    maps every original token id to its stored row, so the model still takes the tokenizer's
    ids. The other rows (``unseen``): "pq" stores them product-quantized (96 bytes per
    384-wide row, dsframe_compress.pq); "nearest" reads the kept row nearest to the row's own
    embedding (cosine); "unk" reads ``unk_id``'s row."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None,
                 keep_ids: torch.Tensor | None = None, unk_id: int = 100, unseen: str = "pq"):
        super().__init__()
        if unseen not in UNSEEN:
            raise ValueError(f"unseen={unseen!r}: allowed are {', '.join(UNSEEN)}")
        w = weight.detach().float()
        vocab = w.shape[0]
        for name in ("remap", "codes", "books"):
            self.register_buffer(name, None)
        if keep_ids is not None:
            keep = torch.unique(torch.cat([keep_ids.flatten().long(), torch.tensor([unk_id])]))
            keep = keep[(keep >= 0) & (keep < vocab)]
            dropped = torch.ones(vocab, dtype=torch.bool)
            dropped[keep] = False
            remap = torch.full((vocab,), int((keep == unk_id).nonzero()[0, 0]), dtype=torch.int32)
            if unseen == "nearest":
                remap[dropped] = nearest_rows(w[dropped], w[keep]).to(torch.int32)
            elif unseen == "pq" and dropped.any():
                from dsframe_compress.pq import product_quantize

                codes, books = product_quantize(w[dropped])
                self.register_buffer("codes", codes)
                self.register_buffer("books", books)
                remap[dropped] = keep.numel() + torch.arange(int(dropped.sum()), dtype=torch.int32)
            remap[keep] = torch.arange(keep.numel(), dtype=torch.int32)
            self.register_buffer("remap", remap.to(torch.int16) if vocab <= 2**15 else remap)
            w = w[keep]
        from dsframe_qat.scheme import row_scales

        scale = row_scales(w, 127)  # the grid QAT trained the rows on
        self.register_buffer("q", (w / scale).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = vocab, w.shape[1]

    @property
    def weight(self) -> torch.Tensor:  # what HF code may read (dtype / device checks)
        return self.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.remap is not None:
            ids = self.remap[ids].long()
        if self.codes is None:
            return self.q[ids].float() * self.scale[ids]
        from dsframe_compress.pq import reconstruct

        n_kept = self.q.shape[0]
        kept = ids.clamp(max=n_kept - 1)
        rows = self.q[kept].float() * self.scale[kept]
        coded = reconstruct(self.codes[(ids - n_kept).clamp(min=0)], self.books)
        return torch.where((ids < n_kept).unsqueeze(-1), rows, coded)


def nearest_rows(queries: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the row of ``table`` with the highest cosine similarity to each query row."""
    t = torch.nn.functional.normalize(table, dim=1)
    out = [torch.nn.functional.normalize(q, dim=1).matmul(t.T).argmax(dim=1) for q in queries.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class _Export(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Temporarily switch HF attention to the eager implementation (onnxruntime fuses its graph)."""
    cfgs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")
            and hasattr(m.config, "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in cfgs.items()}
    try:
        for c in cfgs.values():
            c._attn_implementation = "eager"
        yield model
    finally:
        for k, c in cfgs.items():
            c._attn_implementation = saved[k]


def export_onnx(model: nn.Module, path: str | os.PathLike, seq_len: int = 128, opset: int = 17,
                int8_embeddings: bool = False, keep_token_ids: torch.Tensor | None = None,
                unk_id: int = 100, unseen: str = "pq") -> Path:
    """Legacy (TorchScript) ONNX export with dynamic batch and sequence axes; written atomically."""
    import copy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).eval().float()
    if int8_embeddings:
        emb = _word_embeddings(m)
        if emb is not None:
            parent, name, mod = emb
            setattr(parent, name, Int8RowEmbedding(mod.weight, mod.padding_idx, keep_token_ids, unk_id, unseen))
            for other in ("position_embeddings", "token_type_embeddings"):  # int8 rows too, all kept
                mod = getattr(parent, other, None)
                if isinstance(mod, nn.Embedding):
                    setattr(parent, other, Int8RowEmbedding(mod.weight, mod.padding_idx))
    ids = torch.ones(2, seq_len, dtype=torch.long)
    mask = torch.ones(2, seq_len, dtype=torch.long)
    tmp = path.with_name(f".{path.name}.tmp")
    with eager_attention(m), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Export(m), (ids, mask), str(tmp), input_names=list(INPUTS), output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    os.replace(tmp, path)
    return path


def export_fp32_fused(model: nn.Module, path: str | os.PathLike, seq_len: int = 128) -> Path:
    """The fp32 model as onnxruntime runs it after the same BERT fusion as the int8 export: the
    row that tells the runtime's gain from the compression's."""
    path = Path(path)
    with quiet_logging(), tempfile.TemporaryDirectory() as td:
        src = export_onnx(model, Path(td) / "e.onnx", seq_len)
        optimize_onnx(src, path, model)
    return path


def _word_embeddings(model: nn.Module):
    for parent in model.modules():
        if hasattr(parent, "word_embeddings") and isinstance(parent.word_embeddings, nn.Embedding):
            return parent, "word_embeddings", parent.word_embeddings
    return None


def _num_heads_hidden(model: nn.Module) -> tuple[int, int]:
    from dsframe_compress.structure import encoder_layers, num_heads
    layers = encoder_layers(model)
    if not layers:
        return 0, 0
    heads = {num_heads(l) for l in layers}
    if len(heads) != 1:
        return 0, 0
    # onnxruntime's fusion wants the q/k/v width (heads * head size), not the model width
    return heads.pop(), layers[0].attention.self.query.out_features


def optimize_onnx(src: str | os.PathLike, dst: str | os.PathLike, model: nn.Module | None = None) -> dict:
    """onnxruntime's BERT graph fusion (attention, gelu, layer norm); returns fused op counts.

    Fusion needs one head count for all layers; otherwise the unfused graph is kept."""
    from onnxruntime.transformers import optimizer

    heads, hidden = _num_heads_hidden(model) if model is not None else (0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden,
                                       opt_level=0)  # fusions only; ORT's own graph opts run at load
        tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")
        opt.save_model_to_file(str(tmp))
    os.replace(tmp, dst)
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike, per_channel: bool = True,
                       embeddings_by_ort: bool = True, scheme: str = "auto") -> Path:
    """onnxruntime dynamic quantization: int8 weights (per channel, symmetric; 7-bit with scheme
    ``w7``), uint8 activations quantized per call. ``embeddings_by_ort``: also quantize Gather
    tables (per tensor). The scheme and this machine are written into the file's metadata."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dsframe_qat.scheme import resolve_scheme

    scheme = resolve_scheme(scheme).name
    ops = ["MatMul", "Attention", "Gemm"] + (["Gather", "EmbedLayerNormalization"] if embeddings_by_ort else [])
    tmp = Path(dst).with_name(f".{Path(dst).name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=ops, reduce_range=scheme == "w7",
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    m = onnx.load(str(tmp))
    set_metadata(m, scheme_metadata(scheme))
    onnx.save(m, str(tmp))
    os.replace(tmp, dst)
    return Path(dst)


def scheme_metadata(scheme: str) -> dict[str, str]:
    """What an int8 file says about itself: its weight grid and the machine it was built on."""
    from dsframe.machine import cpu_model, machine_info
    from dsframe_qat.scheme import SCHEMES

    s = SCHEMES[scheme]
    return {"int8_scheme": s.name, "weight_qmax": str(s.qmax), "reduce_range": str(s.reduce_range).lower(),
            "scheme_note": s.description, "built_on_cpu": cpu_model(),
            "built_on_flags": " ".join(machine_info()["cpu_flags"])}


def set_metadata(model, values: dict[str, str]) -> None:
    props = {p.key: p for p in model.metadata_props}
    for k, v in values.items():
        key = META_PREFIX + k
        if key in props:
            props[key].value = v
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, v


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """dsframe's entries of an ONNX file's metadata_props (prefix stripped)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in m.metadata_props if p.key.startswith(META_PREFIX)}


def export_int8(model: nn.Module, out_dir: str | os.PathLike, seq_len: int = 128, fuse: bool = True,
                int8_embeddings: bool = True, keep_token_ids: torch.Tensor | None = None,
                unk_id: int = 100, unseen: str = "pq", scheme: str = "auto") -> dict:
    """fp32 ONNX (``model.onnx``) and the int8 artifact (``model_int8.onnx``) of ``model``.

    ``scheme``: the int8 weight grid (``w8`` | ``w7`` | ``auto`` = this machine's, see
    ``dsframe_qat.scheme``); a QAT model must be exported with the scheme it trained on.

    ``keep_token_ids`` (with ``int8_embeddings``): vocabulary pruning of the int8 artifact —
    only those embedding rows are stored at int8; the others product-quantized (``unseen`` "pq"),
    or ids of other tokens read the nearest kept row ("nearest") or ``unk_id``'s row ("unk")."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_logging():
        from dsframe_qat.scheme import resolve_scheme

        return _export_int8(model, out_dir, seq_len, fuse, int8_embeddings, keep_token_ids, unk_id, unseen,
                            resolve_scheme(scheme).name)


@contextlib.contextmanager
def quiet_logging():
    """onnxruntime's optimizer and quantizer log every node at INFO."""
    import logging

    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _export_int8(model, out_dir: Path, seq_len: int, fuse: bool, int8_embeddings: bool,
                 keep_token_ids, unk_id: int, unseen: str, scheme: str) -> dict:
    fp32 = export_onnx(model, out_dir / "model.onnx", seq_len)
    info: dict = {"onnx": str(fp32)}
    with tempfile.TemporaryDirectory() as td:
        src = export_onnx(model, Path(td) / "e.onnx", seq_len, int8_embeddings=int8_embeddings,
                          keep_token_ids=keep_token_ids if int8_embeddings else None, unk_id=unk_id,
                          unseen=unseen)
        if fuse:
            info["fused_ops"] = optimize_onnx(src, Path(td) / "f.onnx", model)
            src = Path(td) / "f.onnx"
        int8 = quantize_onnx_int8(src, out_dir / "model_int8.onnx", embeddings_by_ort=not int8_embeddings,
                                  scheme=scheme)
    info["onnx_int8"] = str(int8)
    info["scheme"] = scheme
    return info


class OrtModel:
    """An onnxruntime session called like a dsframe model: ``m(input_ids=..., attention_mask=...)``."""

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
        from dsframe_qat.scheme import warn_if_saturates

        warn_if_saturates(self.metadata.get("int8_scheme"), f"{self.path.name} (built on "
                          f"{self.metadata.get('built_on_cpu', '?')})")

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feed = {"input_ids": _np(input_ids), "attention_mask": _np(attention_mask)}
        out = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        return torch.from_numpy(out)

    def eval(self):
        return self


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.int64) if isinstance(t, torch.Tensor) else np.asarray(t, np.int64)


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """torch.ao dynamic int8 (deprecated API, still the fastest int8 path inside torch on CPU):
    Linear layers run fbgemm int8 kernels with per-channel weights."""
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)
