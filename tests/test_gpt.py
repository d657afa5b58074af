"""The GPT decoder: shapes, causality, rebuild from arch, pipeline stages, TP plan coverage."""
import pytest
import torch

from dsframe.errors import ConfigError
from dsframe.models.gpt import GPT, GPTConfig, tp_plan

CFG = dict(vocab_size=50, block_size=12, n_layer=3, n_head=2, n_embd=16)


def test_logits_shape_and_causal():
    torch.manual_seed(0)
    m = GPT.build(GPTConfig(**CFG)).eval()
    x = torch.randint(0, 50, (2, 10))
    y = m(x)
    assert y.shape == (2, 10, 50)
    x2 = x.clone()
    x2[:, 6:] = (x2[:, 6:] + 1) % 50             # change the future
    y2 = m(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6])  # the past does not see it
    assert (y[:, 6:] - y2[:, 6:]).abs().max() > 1e-4


def test_from_arch_round_trip():
    m = GPT.build(GPTConfig(**CFG))
    arch = m.arch()
    import json
    m2 = GPT.from_arch(json.loads(json.dumps(arch)))
    assert m2.arch() == arch
    assert [n for n, _ in m2.named_parameters()] == [n for n, _ in m.named_parameters()]


@pytest.mark.parametrize("key,value", [("n_embd", 15), ("n_layer", 0), ("dropout", 1.0)])
def test_config_checks(key, value):
    with pytest.raises(ConfigError) as e:
        GPTConfig(**{**CFG, key: value})
    assert e.value.key == f"model.{key}"


def test_too_long_sequence():
    with pytest.raises(ValueError, match="block_size 12"):
        GPT.build(GPTConfig(**CFG))(torch.zeros(1, 13, dtype=torch.long))


def test_pipeline_stages_compose_to_the_model():
    torch.manual_seed(0)
    m = GPT.build(GPTConfig(**CFG))
    x = torch.randint(0, 50, (2, 8))
    s0 = m.pipeline_stage(["0"], first=True, last=False)
    s1 = m.pipeline_stage(["1", "2"], first=False, last=True)
    torch.testing.assert_close(s1(s0(x)), m(x), rtol=0, atol=0)
    names = {n for n, _ in s0.named_parameters()} | {n for n, _ in s1.named_parameters()}
    assert names == {n for n, _ in m.named_parameters()}            # whole-model names, no overlap
    assert not ({n for n, _ in s0.named_parameters()} & {n for n, _ in s1.named_parameters()})
    s1.blocks["1"].attn.q.weight.data.zero_()                        # stages are copies
    assert m.blocks["1"].attn.q.weight.abs().sum() > 0


def test_tp_plan_names_existing_linears():
    m = GPT.build(GPTConfig(**CFG))
    plan = tp_plan(m)
    modules = dict(m.named_modules())
    assert set(plan) <= set(modules)
    assert all(isinstance(modules[k], torch.nn.Linear) for k in plan)
    assert len(plan) == 3 * 6 + 1                                      # q k v proj fc proj per block + head
    stage = m.pipeline_stage(["0"], first=True, last=False)
    assert "lm_head" not in tp_plan(stage) and len(tp_plan(stage)) == 6


def test_sequence_parallel_plan_shards_norms_and_residual():
    from torch.distributed.tensor.parallel import PrepareModuleInput, SequenceParallel

    m = GPT.build(GPTConfig(**CFG))
    plan = tp_plan(m, sequence_parallel=True)
    assert isinstance(plan["blocks.0"], PrepareModuleInput) and "blocks.1" not in plan
    assert all(isinstance(plan[f"blocks.{i}.{ln}"], SequenceParallel) for i in range(3) for ln in ("ln_1", "ln_2"))
    assert isinstance(plan["ln_f"], SequenceParallel)
