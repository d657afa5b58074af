"""The outside-plugin example (examples/dsframe-labelsmooth) is what docs/plugins.md shows, builds
as a package, and runs next to first-party plugins exactly as the docs say."""
import csv
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "dsframe-labelsmooth"
DOCS = REPO / "docs" / "plugins.md"


def _doc_blocks() -> dict[str, str]:
    text = DOCS.read_text()
    return {m["path"]: m["body"] for m in
            re.finditer(r"<!-- example: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)```\n", text, re.S)}


def test_docs_quote_every_file_of_the_example_verbatim():
    blocks = _doc_blocks()
    files = {str(p.relative_to(EXAMPLE)) for p in EXAMPLE.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p) and p.stat().st_size}
    assert set(blocks) == files  # every non-empty file is on the page, and nothing else is
    for rel, body in blocks.items():
        assert body == (EXAMPLE / rel).read_text(), f"docs/plugins.md differs from {rel}"
    assert not (EXAMPLE / "hydra_plugins" / "__init__.py").exists()  # a namespace package


@pytest.fixture
def labelsmooth(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import dsframe_labelsmooth

    yield dsframe_labelsmooth
    sys.modules.pop("dsframe_labelsmooth", None)


class _Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, features):
        return self.lin(features)


def test_loss_chain_matches_hand_computation(labelsmooth):
    """Listed after distill, labelsmooth runs first and smooths distill's hard-label term:
    α·KL·τ² + (1−α)·((1−ε)·CE + ε·mean_c(−log p_c)), each piece written out by hand here."""
    from dsframe.plugin import order_plugins
    from dsframe_distill.plugin import DistillConfig, DistillPlugin

    torch.manual_seed(0)
    distill = DistillPlugin(DistillConfig(temperature=2.0, alpha=0.3))
    teacher = _Teacher()
    distill.set_teacher(teacher)
    smooth = labelsmooth.LabelSmoothPlugin(labelsmooth.LabelSmoothConfig(epsilon=0.2))
    ordered = order_plugins([distill, smooth])
    assert [p.name for p in ordered] == ["labelsmooth", "distill"]

    batch = {"features": torch.randn(5, 4), "labels": torch.tensor([0, 2, 1, 1, 0])}
    logits = torch.randn(5, 3)
    loss = F.cross_entropy(logits, batch["labels"])
    for plugin in ordered:  # as Task.training_step chains them
        loss = plugin.loss(None, batch, logits, loss)

    logp = torch.log_softmax(logits, -1)
    ce = -logp[torch.arange(5), batch["labels"]].mean()
    ce_eps = 0.8 * ce + 0.2 * (-logp.mean(-1)).mean()
    t = 2.0
    ps, pt = torch.softmax(logits / t, -1), torch.softmax(teacher(batch["features"]) / t, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    expected = 0.3 * kl * t * t + 0.7 * ce_eps
    assert torch.allclose(loss, expected, atol=1e-6), (loss, expected)
    # epsilon 0 leaves the loss as it is
    assert labelsmooth.LabelSmoothPlugin(labelsmooth.LabelSmoothConfig(0.0)).loss(None, batch, logits, ce) is None


def test_bad_option_is_a_config_error(labelsmooth):
    from dsframe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugins\.labelsmooth\.epsilon=1\.0 is not allowed: a float in \[0, 1\)"):
        labelsmooth.LabelSmoothConfig(epsilon=1.0)


@pytest.mark.slow
def test_installed_example_runs_next_to_prune_and_distill(tmp_path):
    # build and install a copy into a private folder: the checkout stays clean and nothing is
    # installed into the environment other tests use
    source, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert (site / "dsframe_labelsmooth" / "conf" / "plugins" / "labelsmooth.yaml").exists()  # package-data
    assert not (site / "hydra_plugins" / "__init__.py").exists()
    env = {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}

    from importlib.metadata import distributions

    [dist] = [d for d in distributions(path=[str(site)]) if d.metadata["Name"] == "dsframe-labelsmooth"]
    [ep] = [e for e in dist.entry_points if e.group == "dsframe.plugins"]  # what `dsframe list` finds
    assert (ep.name, ep.value) == ("labelsmooth", "dsframe_labelsmooth:LabelSmoothPlugin")

    recipe = ["recipe=bert_compress", "debug=tiny", "recipe.stages.prune.plugins+=[labelsmooth]"]
    bad = run_cli(*recipe, "plugins.labelsmooth.epsilon=1.5", cwd=tmp_path, env=env)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "dsframe: error: plugins.labelsmooth.epsilon=1.5 is not allowed: a float in [0, 1)"]

    # no epsilon given: appending the plugin loads its shipped YAML, as for a first-party plugin
    proc = run_cli(*recipe, "~recipe.stages.qat", "~recipe.stages.export", "~recipe.stages.evaluate",
                   "~recipe.stages.report", "trainer.limit_train_batches=2", "hydra.run.dir=run", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "  labelsmooth:\n    epsilon: 0.1\n" in config
    assert re.search(r"prune:\n(.*\n)*?      plugins:\n      - prune\n      - distill\n      - labelsmooth\n", config)
    rows = list(csv.DictReader(open(tmp_path / "run" / "prune" / "logs" / "fit" / "metrics.csv")))
    deltas = [float(r["labelsmooth/delta"]) for r in rows if r.get("labelsmooth/delta")]
    hidden = [r for r in rows if r.get("distill/hidden_mse")]
    assert len(deltas) == 4 and len(hidden) == 4  # 2 epochs x 2 batches: both terms at every step
    assert all(abs(d) < 1.0 for d in deltas)
    teacher_log = (tmp_path / "run" / "teacher" / "logs" / "fit" / "metrics.csv").read_text()
    assert "labelsmooth" not in teacher_log  # only the stage it was added to


def test_flag_values_are_not_read_as_overrides():
    """`--cfg job` (as the docs suggest for seeing stage names) next to `KEY+=[...]` is expanded."""
    from dsframe.precheck import expand_args

    out = expand_args(["recipe=bert_compress", "recipe.stages.prune.plugins+=[qat]", "--cfg", "job", "-p", "recipe"])
    assert out == ["recipe=bert_compress", "recipe.stages.prune.plugins=[prune,distill,qat]", "--cfg", "job",
                   "-p", "recipe"]
