"""``av_digits``: audio-visual-text digits built the AV-MNIST way (MultiBench; Vielzeuf et al. 2018).

Every modality is split into train/val/test FIRST (stratified by digit, fixed ``split_seed``);
samples are then paired by label INSIDE each split, so no source image, recording or clip is
seen in two splits. One sample per MNIST image of the split; each image gets a recording and a
clip of the same digit (cycled through a shuffled pool) and a freshly noised number word.

    image     MNIST digit, projected onto the leading principal components that keep
              1 - image_energy_removed of the variance (AV-MNIST removes 75 %); PCA fit on train
    audio     FSDD MFCC frames, standardised per coefficient, plus Gaussian noise (audio_noise,
              in units of a coefficient's std) — or espeak-ng waveforms plus white noise at
              waveform_snr_db (audio_source: waveform | both)
    text      the digit's number word in a random language of text_languages, each character
              substituted/deleted/doubled with probability text_noise

The default noise levels were chosen on the VALIDATION split (``dsframe_multimodal.calibrate``;
docs/multimodal_benchmark.md) so that each modality alone is clearly imperfect.
The built arrays are cached (``<DSFRAME_CACHE>/av_digits/built_<key>.npz``, SHA-256 checked).

Batch (the contract in docs/multimodal.md): ``labels``; ``present_<m>`` per provided modality;
text ``input_ids``/``attention_mask``; image ``image`` [B,1,28,28]; audio ``audio`` [B,F,13] +
``audio_mask``; waveform ``waveform`` [B,S] + ``waveform_mask``. An absent modality's tensors
are zeros (masks False) and must be ignored by the model.
"""
from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dsframe.data.loaders import SplitDataModule

from dsframe_multimodal import sources
from dsframe_multimodal.config import SPLITS, AVDigitsConfig

log = logging.getLogger("dsframe")

# keys of the batch each modality contributes (besides present_<m>)
KEYS = {"text": ("input_ids", "attention_mask"), "image": ("image",),
        "audio": ("audio", "audio_mask", "waveform", "waveform_mask")}
_STREAM = {"split_image": 1, "split_audio": 2, "split_wave": 3, "order": 4, "pair_audio": 5, "pair_wave": 6,
           "text": 7, "audio_noise": 8, "image_noise": 9, "missing": 10, "wave_noise": 11}


# -- building the paired splits (cached) --------------------------------------------------------
def _rng(cfg: AVDigitsConfig, stream: str, split: str = "") -> np.random.Generator:
    """Independent, fixed random streams: adding waveforms never changes the image/audio/text pairing."""
    return np.random.default_rng([cfg.split_seed, _STREAM[stream], SPLITS.index(split) if split else 9])


def stratified_split(labels: np.ndarray, val: float, test: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Source indices per split, the same share of every class in each."""
    parts: dict[str, list] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_val = int(round(len(idx) * test)), int(round(len(idx) * val))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def pair_by_label(anchor_labels: np.ndarray, pool: np.ndarray, pool_labels: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """For each anchor, a pool index of the same label, cycling through a shuffled pool per class."""
    out = np.empty(len(anchor_labels), np.int64)
    for c in np.unique(anchor_labels):
        where = np.flatnonzero(anchor_labels == c)
        candidates = rng.permutation(pool[pool_labels[pool] == c])
        if candidates.size == 0:
            raise ValueError(f"no source sample of class {c} in this split to pair with")
        out[where] = candidates[np.arange(where.size) % candidates.size]
    return out


def reduce_energy(flat: np.ndarray, train: np.ndarray, removed: float) -> tuple[np.ndarray, int]:
    """Project images onto the leading principal components (fit on ``train`` rows) that keep
    ``1 - removed`` of the variance; returns the reconstructions and the number of components kept."""
    mean = flat[train].mean(0)
    _, s, vt = np.linalg.svd(flat[train] - mean, full_matrices=False)
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = int(np.searchsorted(energy, 1.0 - removed) + 1) if removed > 0 else len(s)
    basis = vt[:k]
    return (flat - mean) @ basis.T @ basis + mean, k


def noisy_word(word: str, p: float, rng: np.random.Generator) -> str:
    """Each character substituted, deleted or doubled with probability p (never empty)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for ch in word:
        if rng.random() >= p:
            out.append(ch)
            continue
        op = rng.integers(3)
        if op == 0:
            out.append(letters[rng.integers(26)])
        elif op == 2:
            out.extend([ch, letters[rng.integers(26)]])
    return "".join(out) or letters[rng.integers(26)]


def build_key(cfg: AVDigitsConfig) -> dict:
    """The settings a built file depends on (not batch sizes, modalities or missing-modality options)."""
    keys = ("split_seed", "val_fraction", "test_fraction", "image_energy_removed", "image_noise", "audio_noise",
            "text_noise", "text_languages")
    key = {k: getattr(cfg, k) for k in keys}
    key["version"] = 1
    if cfg.waveforms:
        key.update(voices=cfg.voices, speeds=cfg.speeds, pitches=cfg.pitches, waveform_seconds=cfg.waveform_seconds)
    return key


def build(cfg: AVDigitsConfig) -> dict[str, np.ndarray]:
    """All splits as flat arrays named ``<split>_<field>`` (see the module docstring)."""
    images, image_labels = sources.load_mnist()
    mfcc, audio_labels = sources.load_fsdd()
    img_split = stratified_split(image_labels, cfg.val_fraction, cfg.test_fraction, _rng(cfg, "split_image"))
    aud_split = stratified_split(audio_labels, cfg.val_fraction, cfg.test_fraction, _rng(cfg, "split_audio"))

    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    reduced, kept = reduce_energy(flat, img_split["train"], cfg.image_energy_removed)
    mu, sd = reduced[img_split["train"]].mean(), reduced[img_split["train"]].std()
    reduced = ((reduced - mu) / sd).astype(np.float32).reshape(-1, 28, 28)

    train_frames = np.concatenate([mfcc[i] for i in aud_split["train"]])
    f_mu, f_sd = train_frames.mean(0), train_frames.std(0) + 1e-6
    max_frames = max(len(x) for x in mfcc)

    out: dict[str, np.ndarray] = {"image_components_kept": np.array(kept),
                                  "key": np.array(json.dumps(build_key(cfg), sort_keys=True))}
    if cfg.waveforms:
        _, _, wave_labels = sources.load_espeak(cfg.voices, cfg.speeds, cfg.pitches, cfg.waveform_seconds)
        wave_split = stratified_split(wave_labels, cfg.val_fraction, cfg.test_fraction, _rng(cfg, "split_wave"))
    for split in SPLITS:
        anchors = _rng(cfg, "order", split).permutation(img_split[split])
        labels = image_labels[anchors]
        n = len(anchors)
        img = reduced[anchors]
        if cfg.image_noise:
            img = img + cfg.image_noise * _rng(cfg, "image_noise", split).standard_normal(img.shape).astype(np.float32)
        audio_idx = pair_by_label(labels, aud_split[split], audio_labels, _rng(cfg, "pair_audio", split))
        frames = np.zeros((n, max_frames, 13), np.float32)
        lengths = np.array([len(mfcc[i]) for i in audio_idx])
        noise = _rng(cfg, "audio_noise", split)
        for row, i in enumerate(audio_idx):
            x = (mfcc[i] - f_mu) / f_sd
            frames[row, :len(x)] = x + cfg.audio_noise * noise.standard_normal(x.shape)
        text_rng = _rng(cfg, "text", split)
        langs = [cfg.text_languages[text_rng.integers(len(cfg.text_languages))] for _ in range(n)]
        words = [noisy_word(sources.WORDS[lang][y], cfg.text_noise, text_rng) for lang, y in zip(langs, labels)]
        out.update({f"{split}_labels": labels, f"{split}_image_idx": anchors, f"{split}_image": img,
                    f"{split}_audio_idx": audio_idx, f"{split}_audio": frames, f"{split}_audio_len": lengths,
                    f"{split}_text": np.array(words), f"{split}_text_lang": np.array(langs)})
        if cfg.waveforms:
            out[f"{split}_wave_idx"] = pair_by_label(labels, wave_split[split], wave_labels,
                                                     _rng(cfg, "pair_wave", split))
    return out


def load_built(cfg: AVDigitsConfig) -> dict[str, np.ndarray]:
    """The built arrays from the cache (built on first use, rebuilt if the file fails its SHA-256)."""
    key = build_key(cfg)

    def write(tmp_path: str) -> None:
        arrays = build(cfg)
        with open(tmp_path, "wb") as f:
            np.savez(f, **arrays)

    path = sources.cached(f"built_{sources._digest(key)}.npz", write)
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# -- the dataset and its batches --------------------------------------------------------------------
def presence(cfg: AVDigitsConfig, split: str, n: int) -> dict[str, torch.Tensor]:
    """Which samples keep each modality: a fixed draw per split from ``cfg.missing[split]``."""
    probs = {m: float((cfg.missing.get(split) or {}).get(m, 0.0)) for m in cfg.modalities}
    rng = _rng(cfg, "missing", split)
    draws = {m: rng.random(n) >= probs[m] for m in cfg.modalities}
    if cfg.keep_one_present:
        stacked = np.stack([draws[m] for m in cfg.modalities], 1)
        empty = np.flatnonzero(~stacked.any(1))
        # a sample that lost everything keeps one modality, drawn among those that may go missing
        revive = rng.integers(len(cfg.modalities), size=empty.size)
        for row, j in zip(empty, revive):
            draws[cfg.modalities[j]][row] = True
    return {m: torch.from_numpy(d.copy()) for m, d in draws.items()}


class AVDigitsSplit(Dataset):
    """One split; items are indices, and ``collate`` builds the batch from the stored tensors."""

    def __init__(self, cfg: AVDigitsConfig, split: str, arrays: dict, tokenizer=None, waves=None):
        self.cfg, self.split = cfg, split
        n = len(arrays[f"{split}_labels"])
        self.rows = np.arange(n if split != "train" or not cfg.max_train_samples else min(n, cfg.max_train_samples))
        self.labels = torch.from_numpy(arrays[f"{split}_labels"]).long()
        self.present = presence(cfg, split, n)
        self.source = {k[len(split) + 1:]: arrays[k] for k in arrays if k.startswith(split) and k.endswith("_idx")}
        if "image" in cfg.modalities:
            self.image = torch.from_numpy(arrays[f"{split}_image"]).unsqueeze(1)
        if cfg.mfcc:
            self.audio = torch.from_numpy(arrays[f"{split}_audio"])
            self.audio_len = torch.from_numpy(arrays[f"{split}_audio_len"])
        if "text" in cfg.modalities:
            self.words = arrays[f"{split}_text"].tolist()
            self.token_ids = tokenizer(self.words, truncation=True, max_length=cfg.max_length)["input_ids"]
            self.pad_id = tokenizer.pad_token_id or 0
        if cfg.waveforms:
            self.waves, self.wave_len = waves
            self.wave_idx = torch.from_numpy(arrays[f"{split}_wave_idx"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(rows, dtype=torch.long)
        batch: dict[str, torch.Tensor] = {"labels": self.labels[idx]}
        for m in self.cfg.modalities:
            batch[f"present_{m}"] = self.present[m][idx]
        if "image" in self.cfg.modalities:
            batch["image"] = self.image[idx] * batch["present_image"].view(-1, 1, 1, 1)
        if "text" in self.cfg.modalities:
            ids = [self.token_ids[r] for r in rows]
            longest = max(len(t) for t in ids)
            input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for j, t in enumerate(ids):
                input_ids[j, :len(t)], mask[j, :len(t)] = torch.tensor(t), 1
            keep = batch["present_text"].view(-1, 1)
            batch["input_ids"], batch["attention_mask"] = input_ids * keep, mask * keep
        if self.cfg.mfcc:
            lengths = self.audio_len[idx] * batch["present_audio"]
            frames = max(int(lengths.max()), 1)
            batch["audio_mask"] = torch.arange(frames) < lengths.view(-1, 1)
            batch["audio"] = self.audio[idx, :frames] * batch["audio_mask"].unsqueeze(-1)
        if self.cfg.waveforms:
            batch["waveform"], batch["waveform_mask"] = self._waveforms(rows, batch["present_audio"])
        return batch

    def _waveforms(self, rows: list[int], present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip + white noise at ``waveform_snr_db``; the noise of a sample is fixed (seeded by its row)."""
        clips = self.wave_idx[torch.tensor(rows)]
        lengths = self.wave_len[clips] * present
        samples = max(int(lengths.max()), 1)
        mask = torch.arange(samples) < lengths.view(-1, 1)
        out = self.waves[clips, :samples].clone()
        base = self.cfg.split_seed * 1_000_003 + _STREAM["wave_noise"] * 10_007 + SPLITS.index(self.split)
        for j, r in enumerate(rows):
            n = int(lengths[j])
            if n:
                power = out[j, :n].pow(2).mean().clamp_min(1e-8)
                scale = (power / 10 ** (self.cfg.waveform_snr_db / 10)).sqrt()
                gen = torch.Generator().manual_seed(base + 7919 * r)
                out[j, :n] += scale * torch.randn(n, generator=gen)
        return out * mask, mask


def without(batch: dict[str, torch.Tensor], missing) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` in which the modalities ``missing`` are absent for every sample
    (presence False, tensors zeroed), as the data module marks a missing modality."""
    out = dict(batch)
    for m in missing:
        if f"present_{m}" not in batch:
            raise KeyError(f"the batch has no modality '{m}' (it has: "
                           f"{', '.join(k[8:] for k in batch if k.startswith('present_'))})")
        out[f"present_{m}"] = torch.zeros_like(batch[f"present_{m}"])
        for key in KEYS[m]:
            if key in out:
                out[key] = torch.zeros_like(out[key])
    return out


class AVDigitsDataModule(SplitDataModule):
    description: ClassVar[str] = AVDigitsConfig.description
    Config: ClassVar[type] = AVDigitsConfig
    num_classes: int = 10

    def __init__(self, config: AVDigitsConfig):
        super().__init__()
        self.config = config
        self.modalities: tuple[str, ...] = tuple(config.modalities)
        self.batch_size = config.batch_size
        self.splits: dict[str, AVDigitsSplit] = {}
        self.info: dict[str, Any] = {}

    def prepare_data(self) -> None:
        load_built(self.config)
        if self.config.waveforms:
            sources.load_espeak(self.config.voices, self.config.speeds, self.config.pitches, self.config.waveform_seconds)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        cfg = self.config
        arrays = load_built(cfg)
        tokenizer = None
        if "text" in cfg.modalities:
            from dsframe.models.hub import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer, key="data.tokenizer")
        waves = None
        if cfg.waveforms:
            w, lengths, _ = sources.load_espeak(cfg.voices, cfg.speeds, cfg.pitches, cfg.waveform_seconds)
            waves = (torch.from_numpy(w), torch.from_numpy(lengths))
        for split in SPLITS:
            self.splits[split] = AVDigitsSplit(cfg, split, arrays, tokenizer, waves)
        self.info = {"image_components_kept": int(arrays["image_components_kept"]),
                     "sizes": {s: len(d) for s, d in self.splits.items()}, "build": json.loads(str(arrays["key"]))}

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            self.setup()
        data = self.splits[split]
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=data.collate,
                          num_workers=self.config.num_workers, persistent_workers=self.config.num_workers > 0)
