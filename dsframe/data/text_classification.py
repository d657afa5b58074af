"""Shared pieces of the sentence-classification data modules: tokenised splits, padding collate."""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from dsframe.data.loaders import SplitDataModule


class EncodedSentences(Dataset):
    def __init__(self, encodings: dict[str, list[list[int]]], labels: Sequence[int]):
        self.encodings, self.labels = encodings, list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


def pad_collate(items: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch, not to max_length: short sentences run faster."""
    longest = max(len(it["input_ids"]) for it in items)
    batch = {}
    for key in items[0]:
        if key == "labels":
            batch[key] = torch.tensor([it[key] for it in items], dtype=torch.long)
            continue
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([it[key] + [fill] * (longest - len(it[key])) for it in items], dtype=torch.long)
    return batch


class SentenceDataModule(SplitDataModule):
    """Holds tokenised train/val/test splits; subclasses fill ``self.splits`` in ``setup``."""

    num_classes: int = 2

    def __init__(self, config, tokenizer):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.batch_size = config.batch_size
        self.splits: dict[str, EncodedSentences] = {}

    def encode(self, texts: Sequence[str], labels: Sequence[int]) -> EncodedSentences:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.config.max_length)
        keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return EncodedSentences({k: enc[k] for k in keep}, labels)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            self.setup()
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.config.num_workers,
                          collate_fn=lambda b: pad_collate(b, self.tokenizer.pad_token_id or 0),
                          persistent_workers=self.config.num_workers > 0)
