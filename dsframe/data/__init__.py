"""Data modules. Each is registered in the entry-point group ``dsframe.data`` with a ``Config``."""
from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader


class SplitDataModule(pl.LightningDataModule):
    """train/val/test loaders over ``self._loader(split, batch_size, shuffle)``.

    ``batch_size`` is a plain attribute read by ``train_dataloader``, so a callback may change
    it between epochs (with ``reload_dataloaders_every_n_epochs=1``); evaluation uses
    ``config.eval_batch_size``.
    """

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        raise TypeError(f"{type(self).__name__} must define _loader(split, batch_size, shuffle)")

    def train_dataloader(self):
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader("val", self.config.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._loader("test", self.config.eval_batch_size, shuffle=False)
