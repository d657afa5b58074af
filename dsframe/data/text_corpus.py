"""A real English text corpus that needs no download, as byte-level LM sequences.

``source: python_docs`` is the Python Language Reference as it ships inside CPython's standard
library (``pydoc_data.topics``: ~80 topics, ~465 k characters of prose and grammar), so it is
present wherever Python is. ``source: licenses`` reads the license texts Debian ships in
``/usr/share/common-licenses``. Any other value is a path to a UTF-8 text file.

Tokens are UTF-8 bytes (vocabulary 256: no tokenizer to install, and divisible by any tp that is a
power of two). The text is cut into non-overlapping windows of ``seq_len + 1`` bytes:
``input_ids = w[:-1]``, ``labels = w[1:]``. The last ``val_fraction`` of the text (contiguous, so
validation windows never overlap training ones) is the validation split; the test split is the
validation split's second half.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import DataLoader, Dataset

from dsframe.data.loaders import SplitDataModule
from dsframe.data.options import TextCorpusConfig
from dsframe.errors import ConfigError, DsframeError

SOURCES = ("python_docs", "licenses")
LICENSES = Path("/usr/share/common-licenses")



def read_corpus(source: str) -> str:
    if source == "python_docs":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics))
    if source == "licenses":
        files = sorted(p for p in LICENSES.glob("*") if p.is_file()) if LICENSES.is_dir() else []
        if not files:
            raise DsframeError(f"data.source=licenses: no license texts in {LICENSES} (not a Debian system?)")
        return "\n\n".join(p.read_text(errors="replace") for p in files)
    path = Path(source)
    if not path.is_file():
        raise ConfigError("data.source", source, f"one of {', '.join(SOURCES)} or an existing text file")
    return path.read_text(errors="replace")


class Windows(Dataset):
    def __init__(self, data: torch.Tensor, seq_len: int):
        self.data, self.seq_len = data, seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict:
        w = self.data[i * self.seq_len: (i + 1) * self.seq_len + 1].long()
        return {"input_ids": w[:-1], "labels": w[1:]}


class TextCorpusDataModule(SplitDataModule):
    description: ClassVar[str] = TextCorpusConfig.description
    Config: ClassVar[type] = TextCorpusConfig
    vocab_size: ClassVar[int] = 256

    def __init__(self, config: TextCorpusConfig):
        super().__init__()
        self.config = config
        self.batch_size = config.batch_size
        self.splits: dict[str, Windows] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data = torch.frombuffer(bytearray(read_corpus(self.config.source).encode("utf-8")), dtype=torch.uint8)
        n_val = int(len(data) * self.config.val_fraction)
        train, held = data[: len(data) - n_val], data[len(data) - n_val:]
        L = self.config.seq_len
        self.splits["train"] = Windows(train, L)
        if self.config.max_train_samples:
            self.splits["train"] = Windows(train[: self.config.max_train_samples * L + 1], L)
        self.splits["val"] = Windows(held[: len(held) // 2], L)
        self.splits["test"] = Windows(held[len(held) // 2:], L)
        if min(len(s) for s in self.splits.values()) < 1:
            raise ConfigError("data.seq_len", L, "shorter: a split holds no whole window")

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        # drop_last: every batch splits into the pipeline's equal micro-batches
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=True,
                          num_workers=self.config.num_workers)
