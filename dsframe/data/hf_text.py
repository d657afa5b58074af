"""Any Hugging Face text-classification dataset (e.g. glue/sst2), for users with a network.

Needs the ``datasets`` package (``pip install datasets``); it is not a dependency because
the default recipes run offline.
"""
from __future__ import annotations

from typing import ClassVar

from dsframe.data.text_classification import SentenceDataModule
from dsframe.data.options import HFTextConfig
from dsframe.errors import ConfigError, DsframeError
from dsframe.models.hub import load_tokenizer


class HFTextDataModule(SentenceDataModule):
    description: ClassVar[str] = HFTextConfig.description
    Config: ClassVar[type] = HFTextConfig

    def __init__(self, config: HFTextConfig):
        super().__init__(config, load_tokenizer(config.tokenizer, key="data.tokenizer"))
        self.num_classes = config.num_classes

    def _load(self, split: str):
        try:
            import datasets
        except ImportError:
            raise DsframeError("data.kind=hf_text needs the `datasets` package: pip install datasets") from None
        try:
            return datasets.load_dataset(self.config.name, self.config.subset, split=split)
        except Exception as exc:  # network, unknown name or split: all end the run the same way
            raise ConfigError("data.name", f"{self.config.name}/{self.config.subset}:{split}",
                              f"a dataset and split reachable on the Hugging Face hub ({exc})") from None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        c = self.config
        for split, hf_split in (("train", c.train_split), ("val", c.val_split), ("test", c.test_split)):
            ds = self._load(hf_split)
            if split == "train" and c.max_train_samples:
                ds = ds.select(range(min(c.max_train_samples, len(ds))))
            for field in (c.text_field, c.label_field):
                if field not in ds.column_names:
                    raise ConfigError("data.text_field" if field == c.text_field else "data.label_field",
                                      field, f"a column of {c.name}: {', '.join(ds.column_names)}")
            self.splits[split] = self.encode(ds[c.text_field], ds[c.label_field])
