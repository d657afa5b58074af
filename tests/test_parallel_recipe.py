"""recipe=lm_hybrid_parallel: the offline text corpus, the layout check before launch, a real tp2×pp2 run."""
import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from dsframe.data.text_corpus import TextCorpusConfig, TextCorpusDataModule, read_corpus
from dsframe.errors import ConfigError

# registers the components in-process too, so the command works before the entry points are installed
CLI = ("from dsframe import registry\n"
       "from dsframe.models.gpt import GPT\n"
       "from dsframe.data.text_corpus import TextCorpusDataModule\n"
       "from dsframe.parallel.factory import HybridStrategyFactory\n"
       "registry.models.register('gpt', GPT)\n"
       "registry.data.register('text_corpus', TextCorpusDataModule)\n"
       "registry.strategies.register('hybrid', HybridStrategyFactory)\n"
       "from dsframe.cli import main\n"
       "main()\n")


def dsframe(*args, cwd, timeout=240):
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_python_docs_corpus_windows():
    text = read_corpus("python_docs")
    assert len(text) > 300_000 and "assert" in text
    dm = TextCorpusDataModule(TextCorpusConfig(seq_len=32, batch_size=4))
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == b["labels"].shape == (4, 32) and b["input_ids"].dtype == torch.long
    torch.testing.assert_close(b["input_ids"][:, 1:], b["labels"][:, :-1])       # labels = next byte
    n_train = len(dm.splits["train"]) * 32
    assert abs(n_train / len(text.encode()) - 0.95) < 0.01
    v = dm.splits["val"][0]
    assert bytes(v["input_ids"].tolist()).decode(errors="replace") in text         # real text, not noise


def test_corpus_config_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        TextCorpusConfig(val_fraction=0.7)
    assert e.value.key == "data.val_fraction"
    with pytest.raises(ConfigError, match="existing text file"):
        read_corpus(str(tmp_path / "missing.txt"))
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 100)
    dm = TextCorpusDataModule(TextCorpusConfig(source=str(f), seq_len=16, batch_size=2))
    dm.setup()
    assert len(dm.splits["train"]) == (int(1200 * 0.95) - 1) // 16


def test_impossible_layout_fails_before_launch(tmp_path):
    out = dsframe("recipe=lm_hybrid_parallel", "strategy.tp=3", cwd=tmp_path, timeout=120)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "dp·tp·pp must equal the world size 4" in err[0], out.stderr[-2000:]
    out = dsframe("recipe=lm_hybrid_parallel", "strategy.micro_batches=3", cwd=tmp_path, timeout=120)
    assert out.returncode == 1 and "data.batch_size" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_recipe_debug_trains_tp2_pp2_on_4_processes(tmp_path):
    out = dsframe("recipe=lm_hybrid_parallel", "debug=lm_fast", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Starting with 4 processes" in out.stderr + out.stdout
    run_dir = next((tmp_path / "outputs" / "lm_hybrid_parallel").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())["train"]
    rows = [r for r in csv.DictReader(open(run_dir / "train" / "logs" / "fit" / "metrics.csv")) if r["train/loss"]]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) >= 4 and losses[-1] < losses[0] - 0.3              # the loss falls
    assert losses[0] < math.log(256) + 0.5
    # the single-process test stage saw the trained weights the ranks handed back
    assert metrics["test"]["test/loss"] < math.log(256) - 1.0
    ckpt = run_dir / "train" / "checkpoints" / "last.ckpt"
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == 4
    assert (run_dir / "train" / "model.pt").is_file()
