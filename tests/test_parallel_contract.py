"""The parallel contract: dsframe/parallel names no model; the BERT classifier (bert_compress's
teacher) and a model from "another package" get TP and PP from the contract alone, with parity."""
import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from dsframe import registry  # noqa: E402
from dsframe.errors import ConfigError  # noqa: E402
from dsframe.parallel import contract  # noqa: E402
from dsframe.parallel.factory import HybridConfig, HybridStrategyFactory  # noqa: E402
from dsframe.parallel.testing import RunSpec, build_model, build_task, max_abs_diff, run  # noqa: E402

TOL = 1e-5
PARALLEL = Path(__file__).resolve().parents[1] / "dsframe" / "parallel"

# the teacher of recipe=bert_compress at debug=tiny's shape, dropout off (parity is exact arithmetic)
BERT = dict(kind="bert", name_or_path="minilm", pretrained=False, num_labels=3, dropout=0.0,
            hf_config=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
BERT_RUN = dict(model=BERT, task="classification", vocab=500, seq_len=12, global_batch=8, steps=3, lr=0.05)


def test_parallel_package_names_no_model():
    """Everything model-specific is behind the contract: no model kind, class or layer name in the
    machinery (testing.py, the parity harness, names its default model by registry name only)."""
    words = re.compile(r"\b(gpt|GPT|bert|Bert|BERT|wte|wpe|ln_f|lm_head|block_size|n_head|n_embd|vocab_size)\b")
    for f in sorted(PARALLEL.glob("*.py")):
        if f.name == "testing.py":
            continue
        hits = [(i + 1, line.strip()) for i, line in enumerate(f.read_text().splitlines()) if words.search(line)]
        assert not hits, f"{f.name} names a model: {hits[:3]}"


def test_bert_stages_compose_to_the_model():
    model = build_model(RunSpec(**BERT_RUN)).eval()
    ids = torch.randint(1, 500, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    s0 = model.pipeline_stage(["0"], first=True, last=False)
    s1 = model.pipeline_stage(["1"], first=False, last=True)
    torch.testing.assert_close(s1(*s0(ids, mask)), model(ids, mask), rtol=0, atol=1e-6)
    names = {n for n, _ in model.named_parameters()}
    merged = contract.merge_stages([s0, s1])
    assert {n for n, _ in merged.named_parameters()} == names              # whole-model names, all of them
    assert getattr(merged.encoder.encoder.layer, "1") is s1.encoder.encoder.layer["1"]   # shared, not copied
    assert "1" not in s0.encoder.encoder.layer                             # the stages are untouched


# ------------------------------------------------------------------ a model from "another package"
@dataclass
class ToyConfig:
    kind: str = "toy_lm"
    vocab_size: int = 64
    width: int = 32
    depth: int = 4


class ToyBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(w), nn.Linear(w, 2 * w), nn.Linear(2 * w, w)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class ToyLM(nn.Module):
    """A residual MLP language model written against the documented contract only."""

    kind = "toy_lm"
    Config = ToyConfig

    def __init__(self, c: ToyConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.layers = nn.ModuleDict({str(i): ToyBlock(c.width) for i in range(c.depth)})
        self.head = nn.Linear(c.width, c.vocab_size)

    @classmethod
    def build(cls, c):
        return cls(c)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids) if self.embed is not None else input_ids
        for layer in self.layers.values():
            x = layer(x)
        return self.head(x) if self.head is not None else x

    # the contract
    def tp_plan(self):                # no sequence-parallel variant: offers_sequence_parallel unset
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
        plan = {}
        for k in self.layers:
            plan[f"layers.{k}.up"], plan[f"layers.{k}.down"] = ColwiseParallel(), RowwiseParallel()
        if self.head is not None:
            plan["head"] = ColwiseParallel(output_layouts=Replicate())
        return plan

    def tp_divisible(self):
        return {"model.width": self.c.width, "model.vocab_size": self.c.vocab_size}

    def pipeline_units(self):
        return list(self.layers)

    def pipeline_stage(self, units, first, last):
        stage = copy.copy(self)
        stage._modules = dict(self._modules)
        stage.layers = nn.ModuleDict({k: copy.deepcopy(v) for k, v in self.layers.items() if k in units})
        stage.embed = copy.deepcopy(self.embed) if first else None
        stage.head = copy.deepcopy(self.head) if last else None
        return stage

    def pipeline_inputs(self, batch):
        return (batch["input_ids"],)

    def layer_flops(self, seq_len=None):
        return {**{k: 8.0 * self.c.width ** 2 for k in self.layers}, "head": 2.0 * self.c.width * self.c.vocab_size}

    def pipeline_example(self, batch_size, seq_len=None):
        return {"input_ids": torch.randint(0, self.c.vocab_size, (batch_size, seq_len or 16))}


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(registry.models._extra, "toy_lm", ToyLM)   # what its package's entry point does


def test_outside_model_is_validated_through_the_contract(toy_registered):
    model = build_model(RunSpec(model=dict(kind="toy_lm", width=30)))
    f = HybridStrategyFactory()
    f.validate(HybridConfig(pp=2, tp=2, micro_batches=2), 4, model, 8)
    with pytest.raises(ConfigError) as e:
        f.validate(HybridConfig(tp=4), 4, model, 8)
    assert e.value.key == "model.width" and e.value.value == 30
    f.validate(HybridConfig(pp=2, micro_batches=2, balance="measured"), 2, model, 8)
    no_example = type("NoExample", (ToyLM,), {"pipeline_example": None})(model.c)
    with pytest.raises(ConfigError, match="no pipeline_example") as e:
        f.validate(HybridConfig(pp=2, micro_batches=2, balance="measured"), 2, no_example, 8)
    assert e.value.key == "strategy.balance"


@pytest.mark.slow
def test_outside_model_trains_pp2_tp2_like_one_process(toy_registered, tmp_path):
    base = dict(model=dict(kind="toy_lm"), steps=3)
    ref = run(RunSpec(**base), str(tmp_path / "ref.pt"))
    spec = RunSpec(layout=dict(pp=2, tp=2, micro_batches=2), **base)
    res = run(spec, str(tmp_path / "r.pt"))
    assert res["stage_plan"]["stages"] == [["0", "1"], ["2", "3"]]
    _check(res, ref, spec)


# ------------------------------------------------------------------ bert_compress's teacher
@pytest.fixture(scope="module")
def bert_reference(tmp_path_factory):
    return run(RunSpec(**BERT_RUN), str(tmp_path_factory.mktemp("bert") / "ref.pt"))


def _check(res, ref, spec):
    init = build_task(spec).model.state_dict()
    assert max_abs_diff(ref["params"], init) > 1e-3                       # training moved the weights
    assert len(res["losses"]) == len(ref["losses"]) == spec.steps
    assert max(abs(a - b) for a, b in zip(res["losses"], ref["losses"])) <= TOL
    assert max_abs_diff(res["params"], ref["params"]) <= TOL
    assert max_abs_diff(res["parent_params"], res["params"]) == 0.0       # handed back whole


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(pp=2, micro_batches=2), dict(pp=2, tp=2, micro_batches=2)],
                         ids=["pp2", "pp2_tp2"])
def test_bert_classifier_pipeline_matches_one_process(layout, bert_reference, tmp_path):
    spec = RunSpec(layout=layout, **BERT_RUN)
    _check(run(spec, str(tmp_path / "r.pt")), bert_reference, spec)


TEACHER_ONLY = ["recipe=bert_compress", "debug=tiny", *[f"~recipe.stages.{s}" for s in
                                                          ("prune", "qat", "export", "evaluate", "report")],
                "model.dropout=0", "+model.hf_config.hidden_dropout_prob=0",
                "+model.hf_config.attention_probs_dropout_prob=0"]


def _teacher_run(tmp_path, *overrides):
    import csv

    from tests.conftest import run_cli

    out = run_cli(*TEACHER_ONLY, *overrides, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    stage = next((tmp_path / "outputs" / "bert_compress").iterdir()) / "teacher"
    rows = list(csv.DictReader(open(stage / "logs" / "fit" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    val = [(float(r["val/loss"]), float(r["val/acc"])) for r in rows if r["val/loss"]]
    weights = torch.load(stage / "model.pt", weights_only=False)["state_dict"]
    return losses, val, weights, out.stdout + out.stderr


@pytest.mark.slow
def test_bert_compress_teacher_stage_under_pp2_tp2_matches_one_process(tmp_path):
    """The real recipe stage (its data, ClassificationTask, AdamW with warm-up, validation with
    accuracy) on 4 ranks, pipeline 2 × tensor 2, against the same command on one process."""
    (tmp_path / "one").mkdir()
    (tmp_path / "pp").mkdir()
    ref_losses, ref_val, ref_w, _ = _teacher_run(tmp_path / "one")
    losses, val, w, log = _teacher_run(tmp_path / "pp", "strategy=hybrid", "strategy.pp=2", "strategy.tp=2",
                                       "strategy.micro_batches=2", "trainer.devices=4")
    assert "Starting with 4 processes" in log and "pipeline: 2 stages" in log
    assert len(losses) == len(ref_losses) == 8 and len(val) == len(ref_val) == 2
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= TOL
    assert max(abs(a - b) for (a, _), (b, _) in zip(val, ref_val)) <= TOL
    assert [acc for _, acc in val] == [acc for _, acc in ref_val]          # the task's own metrics ran
    assert max_abs_diff(w, ref_w) <= TOL                                  # model.pt: the whole trained model
