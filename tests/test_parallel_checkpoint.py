"""Distributed checkpoints: save and resume under one layout, load under another (DCP reshards)."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from dsframe.errors import CheckpointError  # noqa: E402
from dsframe.models.gpt import GPT, GPTConfig  # noqa: E402
from dsframe.parallel.checkpoint import is_distributed_checkpoint, load_model_weights  # noqa: E402
from dsframe.parallel.testing import RunSpec, max_abs_diff, run  # noqa: E402

DATA = dict(n_batches=6)   # the data set does not depend on how many steps a run makes
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    out = {"dir": d}
    # one process: 3 steps, Lightning's own checkpoint, resumed to 6 steps
    out["ref3"] = run(RunSpec(steps=3, ckpt_dir=str(d / "ref.ckpt"), **DATA), str(d / "ref3.pt"))
    out["ref6"] = run(RunSpec(steps=6, resume_from=str(d / "ref.ckpt"), **DATA), str(d / "ref6.pt"))
    # tp=2: 3 steps, a DCP folder
    out["tp3"] = run(RunSpec(steps=3, layout=dict(tp=2), ckpt_dir=str(d / "tp2"), **DATA), str(d / "tp3.pt"))
    return out


@pytest.mark.slow
def test_tp2_checkpoint_is_sharded_and_loads_into_one_process(runs):
    path = runs["dir"] / "tp2"
    assert is_distributed_checkpoint(path)
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    model = load_model_weights(path, GPT(GPTConfig(**RunSpec().model)))
    assert max_abs_diff(model.state_dict(), runs["tp3"]["params"]) == 0.0
    assert max_abs_diff(runs["tp3"]["params"], runs["ref3"]["params"]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2, micro_batches=2)], ids=["same_tp2", "tp2_to_pp2"])
def test_resume_matches_one_process_resume(runs, layout, tmp_path):
    res = run(RunSpec(steps=6, layout=layout, resume_from=str(runs["dir"] / "tp2"), **DATA), str(tmp_path / "r.pt"))
    ref = runs["ref6"]
    assert len(res["losses"]) == len(ref["losses"]) == 3                  # resumed at step 3
    assert max(abs(a - b) for a, b in zip(res["losses"], ref["losses"])) <= TOL
    assert max_abs_diff(res["params"], ref["params"]) <= TOL              # weights + momentum restored
    assert max_abs_diff(ref["params"], runs["ref3"]["params"]) > 1e-3      # and training went on


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a distributed checkpoint"):
        load_model_weights(tmp_path, GPT(GPTConfig()))


@pytest.mark.slow
def test_load_into_other_architecture_fails(runs):
    with pytest.raises(CheckpointError, match="does not fit GPT"):
        load_model_weights(runs["dir"] / "tp2", GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=4,
                                                               n_embd=48)))


@pytest.mark.slow
def test_pp2_tp2_checkpoint_loads_into_one_process(runs, tmp_path):
    """4 ranks, each holding a TP shard of one pipeline stage: DCP merges them into one model."""
    res = run(RunSpec(steps=3, layout=dict(pp=2, tp=2, micro_batches=2), ckpt_dir=str(tmp_path / "pt"), **DATA),
              str(tmp_path / "r.pt"))
    assert len(list((tmp_path / "pt").glob("*.distcp"))) == 4
    model = load_model_weights(tmp_path / "pt", GPT(GPTConfig(**RunSpec().model)))
    assert max_abs_diff(model.state_dict(), res["params"]) == 0.0
    assert max_abs_diff(res["params"], runs["ref3"]["params"]) <= TOL
