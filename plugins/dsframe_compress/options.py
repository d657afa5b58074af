"""Options of the bert_compress stage functions (``recipe.stages.<name>.options``). No torch here:
every value is checked when the config is, before the first stage trains."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from dsframe.errors import ConfigError
from dsframe_qat.config import SCHEME_CHOICES

UNSEEN = ("pq", "nearest", "unk")  # what the int8 artifact does with token rows not kept
BASELINES = ("ort_fp32", "ort_int8", "bf16")


@dataclass
class ExportOptions:
    description: ClassVar[str] = "onnx + onnxruntime int8 (fused, per-channel) of a stage's model, with the portable predict folder"
    source: Optional[str] = None  # stage whose model.pt is exported (null: the last fit stage)
    seq_len: int = 128
    fuse: bool = True             # onnxruntime BERT fusion (attention, gelu, layer norm)
    int8_embeddings: bool = True  # word embeddings as int8 rows + per-row scale
    vocab: str = "train"          # int8 artifact keeps embedding rows of: train (ids in the
                                  # training split + special tokens) | all
    unseen: str = "pq"            # with vocab=train, rows of the other tokens: product-quantized,
                                  # 96 bytes per 384-wide row (pq) | dropped, the id reads the
                                  # kept row nearest its embedding (nearest) or [UNK]'s (unk)
    scheme: str = "auto"          # int8 weight grid: auto (the grid the source's QAT trained on,
                                  # else this machine's: w7 on x86 without VNNI/AMX) | w8 | w7
    portable: bool = True         # predict.py, predict.json, tokenizer/ and model.pt2 (torch.export)
                                  # beside the int8 model: predicting needs no dsframe

    def __post_init__(self):
        if self.vocab not in ("train", "all"):
            raise ConfigError("options.vocab", self.vocab, "train or all")
        if self.unseen not in UNSEEN:
            raise ConfigError("options.unseen", self.unseen, " | ".join(UNSEEN))
        if self.scheme not in SCHEME_CHOICES:
            raise ConfigError("options.scheme", self.scheme, " | ".join(SCHEME_CHOICES))
        if self.seq_len < 1:
            raise ConfigError("options.seq_len", self.seq_len, "an integer >= 1")


@dataclass
class EvaluateOptions:
    description: ClassVar[str] = "test accuracy (the one read of the test split), file size and latency of every model; McNemar"
    stages: List[str] = field(default_factory=lambda: ["teacher", "prune", "qat"])  # torch fp32 models
    int8: Optional[str] = "export"  # stage holding model_int8.onnx (null: none)
    baseline: str = "teacher"       # speedup and size ratio are against this stage
    # the baseline model through other runtimes: ort_fp32 (onnxruntime fp32, same fusion as the
    # int8 student: tells runtime gain from compression gain), ort_int8 (onnxruntime dynamic int8,
    # stock embeddings, the machine's scheme), bf16 (torch autocast)
    baselines: List[str] = field(default_factory=lambda: ["ort_fp32", "ort_int8"])
    batches: List[int] = field(default_factory=lambda: [1, 8])
    threads: List[int] = field(default_factory=lambda: [1, 2])
    seq_len: int = 128              # fixed-shape latency (bK_tN)
    sentences: Optional[int] = 128  # test sentences timed at their own lengths (test_bK_tN); null: all, 0: none
    repeats: int = 3                # the whole latency measurement, repeated: median, min, max
    calls: int = 4                  # timed calls per model and fixed shape in one measurement
    limit_test_batches: Optional[int] = None

    def __post_init__(self):
        if self.baseline not in self.stages:
            raise ConfigError("options.baseline", self.baseline, f"one of the evaluated stages {list(self.stages)}")
        for b in self.baselines:
            if b not in BASELINES:
                raise ConfigError("options.baselines", b, " | ".join(BASELINES))
        if self.repeats < 3:
            raise ConfigError("options.repeats", self.repeats, "3 or more (a median with min and max beside it)")
        for key in ("batches", "threads"):
            if not getattr(self, key) or min(getattr(self, key)) < 1:
                raise ConfigError(f"options.{key}", list(getattr(self, key)), "a non-empty list of integers >= 1")
        if self.seq_len < 1 or self.calls < 1:
            key = "seq_len" if self.seq_len < 1 else "calls"
            raise ConfigError(f"options.{key}", getattr(self, key), "an integer >= 1")
        if self.sentences is not None and self.sentences < 0:
            raise ConfigError("options.sentences", self.sentences, "null (all), 0 (none) or an integer >= 1")


@dataclass
class ReportOptions:
    description: ClassVar[str] = "report.json, report.md and report.png of the compression run"
    source: str = "evaluate"  # the evaluate stage whose metrics are reported
