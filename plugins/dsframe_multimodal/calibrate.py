"""Choose the noise level of each modality on the VALIDATION split.

For every candidate level, the splits are rebuilt (not cached) and a small probe — an MLP on
fixed features of one modality alone, trained on train, scored on val — measures how much of the
digit that modality still gives away. The level whose probe accuracy is nearest ``target`` (a
single modality clearly imperfect yet far above the 10 % of chance) is chosen. The test split is
never read. Run ``python benchmarks/multimodal_noise.py`` to redo it; the chosen values are the
defaults of ``AVDigitsConfig`` and ``conf/data/av_digits.yaml``.

Features: image = the pixels, 2x2 average-pooled (196); audio = per-coefficient mean and std over the whole recording
and the means of its three thirds (65 numbers); text = hashed character 1-3-gram counts of the
noisy word (512 buckets); waveform = the same pooling over 40 log-power bands of ``torch.stft``.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dsframe_multimodal import sources
from dsframe_multimodal.data import AVDigitsConfig, AVDigitsSplit, build

LEVELS = {
    "image": ("image_energy_removed", [0.6, 0.75, 0.8, 0.85]),
    "audio": ("audio_noise", [1.5, 2.5, 3.5, 4.5]),
    "text": ("text_noise", [0.3, 0.4, 0.5, 0.6]),
    "waveform": ("waveform_snr_db", [10.0, 0.0, -5.0, -10.0]),
}


def pooled(frames: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean and std over the valid frames, plus the means of the three thirds: [N, 5·D]."""
    out = []
    for x, n in zip(frames, lengths):
        x = x[:max(int(n), 1)]
        thirds = [part.mean(0) if len(part) else x.mean(0) for part in np.array_split(x, 3)]
        out.append(np.concatenate([x.mean(0), x.std(0), *thirds]))
    return np.stack(out).astype(np.float32)


def char_ngrams(words: Sequence[str], buckets: int = 512) -> np.ndarray:
    out = np.zeros((len(words), buckets), np.float32)
    for i, w in enumerate(words):
        w = f"^{w}$"
        for n in (1, 2, 3):
            for j in range(len(w) - n + 1):
                out[i, zlib.crc32(w[j:j + n].encode()) % buckets] += 1
    return out


def log_bands(waves: torch.Tensor, mask: torch.Tensor, bands: int = 40) -> np.ndarray:
    spec = torch.stft(waves, n_fft=400, hop_length=160, window=torch.hann_window(400), return_complex=True)
    power = spec.abs().pow(2)[:, :200]  # [B, 200 bins, frames]
    power = power.reshape(power.shape[0], bands, -1, power.shape[-1]).mean(2)
    feats = torch.log(power + 1e-6).transpose(1, 2).numpy()  # [B, frames, bands]
    lengths = (mask.sum(1) // 160 + 1).numpy()
    return pooled(feats, lengths)


def features(cfg: AVDigitsConfig, arrays: dict, split: str, modality: str) -> np.ndarray:
    if modality == "image":
        img = torch.from_numpy(arrays[f"{split}_image"]).unsqueeze(1)
        return nn.functional.avg_pool2d(img, 2).flatten(1).numpy()  # 14x14: a quarter of the probe's cost
    if modality == "audio":
        return pooled(arrays[f"{split}_audio"], arrays[f"{split}_audio_len"])
    if modality == "text":
        return char_ngrams(arrays[f"{split}_text"].tolist())
    if modality == "waveform":
        w, lengths, _ = sources.load_espeak(cfg.voices, cfg.speeds, cfg.pitches, cfg.waveform_seconds)
        data = AVDigitsSplit(cfg, split, arrays, waves=(torch.from_numpy(w), torch.from_numpy(lengths)))
        parts = [log_bands(*data._waveforms(list(range(i, min(i + 256, len(data)))),
                                            torch.ones(min(256, len(data) - i), dtype=torch.bool)))
                 for i in range(0, len(data), 256)]
        return np.concatenate(parts)
    raise ValueError(modality)


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                   seed: int = 0, steps: int = 200) -> float:
    """Val accuracy of a one-hidden-layer MLP trained full-batch on standardised features."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared machine
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xv = torch.from_numpy((x_train - mu) / sd), torch.from_numpy((x_val - mu) / sd)
    yt = torch.from_numpy(y_train)
    net = nn.Sequential(nn.Dropout(0.2), nn.Linear(xt.shape[1], 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    net.eval()
    torch.set_num_threads(threads)
    with torch.no_grad():
        return float((net(xv).argmax(1).numpy() == y_val).mean())


def sweep(modality: str, levels: Sequence[float] | None = None, base: AVDigitsConfig | None = None,
          seeds: Sequence[int] = (0, 1), progress: Callable[[str], None] = print) -> list[dict]:
    """Probe val accuracy (mean over ``seeds``) at each noise level of one modality."""
    key, default_levels = LEVELS[modality]
    base = base or AVDigitsConfig(audio_source="both" if modality == "waveform" else "mfcc")
    rows = []
    for level in levels or default_levels:
        cfg = dataclasses.replace(base, **{key: level})
        arrays = build(cfg)
        xt, xv = features(cfg, arrays, "train", modality), features(cfg, arrays, "val", modality)
        accs = [probe_accuracy(xt, arrays["train_labels"], xv, arrays["val_labels"], seed=s) for s in seeds]
        rows.append({"key": key, "level": level, "val_acc": round(float(np.mean(accs)), 4),
                     **({"components_kept": int(arrays["image_components_kept"])} if modality == "image" else {})})
        progress(f"{modality:8s} {key}={level:<6} val_acc={rows[-1]['val_acc']:.3f}")
    return rows


def choose(rows: list[dict], target: float) -> dict:
    """The level whose val accuracy is nearest ``target`` (ties: the milder noise, listed first)."""
    return min(rows, key=lambda r: abs(r["val_acc"] - target))
