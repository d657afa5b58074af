"""Shared helpers for the compression tests: a tiny random BERT classifier."""
from __future__ import annotations

import torch
from transformers import BertConfig as HFBertConfig, BertModel

from dsframe import registry
from dsframe.models.bert import BertClassifier


def tiny_bert(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4, ffn: int = 64,
              vocab: int = 100, num_labels: int = 2, attn: str = "eager") -> BertClassifier:
    torch.manual_seed(seed)
    cfg = HFBertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=ffn, max_position_embeddings=64, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation=attn)
    enc = BertModel(cfg, add_pooling_layer=False)
    return BertClassifier(enc, num_labels, "mean", 0.0)


def ensure_bert_registered() -> None:
    if "bert" not in registry.models.names():
        registry.models.register("bert", BertClassifier)


def batch(n: int = 4, seq: int = 12, vocab: int = 100, seed: int = 1, num_labels: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (n,), generator=g)}


def logits(model, b: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])


def ensure_compress_registered() -> None:
    """Register the compression plugins and stages in-process when their entry points are not
    installed (a source checkout without ``pip install -e .``); installed ones are left alone."""
    import dsframe_distill.plugin
    import dsframe_prune.plugin
    import dsframe_qat.plugin
    from dsframe_compress import stages

    ensure_bert_registered()
    for name, obj in (("prune", dsframe_prune.plugin.PrunePlugin), ("qat", dsframe_qat.plugin.QATPlugin),
                      ("distill", dsframe_distill.plugin.DistillPlugin)):
        if name not in registry.plugins.names():
            registry.plugins.register(name, obj)
    for name, obj in (("compress_export", stages.export), ("compress_evaluate", stages.evaluate),
                      ("compress_report", stages.report)):
        if name not in registry.stages.names():
            registry.stages.register(name, obj)
