"""ParallelDims and strategy=hybrid validation: every impossible layout fails before any process starts."""
import pytest

from dsframe.errors import ConfigError
from dsframe.models.gpt import GPT, GPTConfig
from dsframe.parallel.factory import HybridConfig, HybridStrategyFactory
from dsframe.parallel.layout import ParallelDims


def small_gpt(**kw):
    cfg = dict(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=32)
    cfg.update(kw)
    return GPT.build(GPTConfig(**cfg))


def test_world_size_must_equal_product():
    with pytest.raises(ConfigError, match=r"dp·tp·pp must equal the world size 4.*here it is 8") as e:
        ParallelDims(dp=2, tp=2, pp=2, micro_batches=2).validate_world(4)
    assert e.value.key == "strategy"
    ParallelDims(dp=2, tp=2, pp=2, micro_batches=2).validate_world(8)


@pytest.mark.parametrize("key,value", [("dp", 0), ("tp", -1), ("pp", 1.5), ("micro_batches", 0)])
def test_sizes_are_positive_integers(key, value):
    with pytest.raises(ConfigError) as e:
        ParallelDims(**{key: value})
    assert e.value.key == f"strategy.{key}" and e.value.value == value


def test_schedule_and_micro_batches():
    with pytest.raises(ConfigError, match="one of gpipe, 1f1b, interleaved_1f1b, interleaved_zb, zbv, dualpipev"):
        ParallelDims(schedule="zero_bubble")
    with pytest.raises(ConfigError, match="at least pp=4 micro-batches") as e:
        ParallelDims(pp=4, micro_batches=2)
    assert e.value.key == "strategy.micro_batches"
    with pytest.raises(ConfigError, match="multiple of pp=2 for the interleaved_1f1b"):
        ParallelDims(pp=2, micro_batches=3, schedule="interleaved_1f1b")
    with pytest.raises(ConfigError, match="at least 2·pp=4 for DualPipeV"):
        ParallelDims(pp=2, micro_batches=3, schedule="dualpipev")


def test_zero_bubble_v_stages():
    from dsframe.parallel.pipeline import stage_ids

    d = ParallelDims(pp=2, micro_batches=4, schedule="zbv")
    assert d.stages_per_rank == 2 and d.num_stages == 4 and d.v_shaped
    assert stage_ids(0, 2, 2, v_shaped=True) == [0, 3] and stage_ids(1, 2, 2, v_shaped=True) == [1, 2]
    assert not ParallelDims(pp=2, micro_batches=4, schedule="interleaved_zb").v_shaped


@pytest.mark.parametrize("dim,value", [("n_head", 6), ("n_embd", 30), ("vocab_size", 63)])
def test_model_dims_divisible_by_tp(dim, value):
    dims = {"model.n_head": 4, "model.n_embd": 32, "model.vocab_size": 64}
    dims[f"model.{dim}"] = value
    with pytest.raises(ConfigError, match=r"a multiple of strategy.tp=4") as e:
        ParallelDims(tp=4).validate_model(units=4, divisible=dims)
    assert e.value.key == f"model.{dim}" and e.value.value == value


def test_layers_at_least_stages():
    with pytest.raises(ConfigError, match="at least strategy.pp=4 layers") as e:
        ParallelDims(pp=4, micro_batches=4).validate_model(units=3)
    assert e.value.key == "model.n_layer"
    with pytest.raises(ConfigError, match="pp=2 × 2 virtual stages"):
        ParallelDims(pp=2, micro_batches=2, schedule="interleaved_1f1b").validate_model(units=3)
    ParallelDims(pp=2, micro_batches=2, schedule="interleaved_1f1b").validate_model(units=4)


def test_batch_divides_into_micro_batches():
    with pytest.raises(ConfigError, match="multiple of strategy.micro_batches=4") as e:
        ParallelDims(pp=2, micro_batches=4).validate_batch(6)
    assert e.value.key == "data.batch_size"
    ParallelDims(pp=2, micro_batches=4).validate_batch(8)


def test_coords_match_mesh_order():
    d = ParallelDims(dp=2, tp=2, pp=2, micro_batches=2)
    assert [tuple(d.coords(r).values()) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert d.bubble_fraction() == pytest.approx(1 / 3)


def test_factory_validate_before_launch():
    f = HybridStrategyFactory()
    model = small_gpt()
    f.validate(HybridConfig(tp=2, pp=2, micro_batches=2), 4, model, 8)
    with pytest.raises(ConfigError, match="world size 2"):
        f.validate(HybridConfig(tp=2, pp=2, micro_batches=2), 2, model, 8)
    with pytest.raises(ConfigError) as e:
        f.validate(HybridConfig(tp=8), 8, model, 8)      # 4 heads
    assert e.value.key == "model.n_head"
    with pytest.raises(ConfigError) as e:
        f.validate(HybridConfig(pp=2, micro_batches=4), 2, model, 6)
    assert e.value.key == "data.batch_size"
    with pytest.raises(ConfigError, match="cannot be cut into pipeline stages.*lacks pipeline_units"):
        f.validate(HybridConfig(pp=2, micro_batches=2), 2, object(), 8)
    with pytest.raises(ConfigError, match="no tensor-parallel plan.*lacks tp_plan, tp_divisible"):
        f.validate(HybridConfig(tp=2), 2, object(), 8)


def test_config_schema_errors():
    with pytest.raises(ConfigError) as e:
        HybridConfig(dp_mode="zero3")
    assert e.value.key == "strategy.dp_mode"
    with pytest.raises(ConfigError) as e:
        HybridConfig(pp=2, micro_batches=2, sequence_parallel=True)
    assert e.value.key == "strategy.sequence_parallel"
    with pytest.raises(ConfigError, match="false when pp > 1") as e:
        HybridConfig(pp=2, micro_batches=2, dp=2, dp_overlap=True)
    assert e.value.key == "strategy.dp_overlap"
    with pytest.raises(ConfigError) as e:
        HybridConfig(dp=2, dp_mode="fsdp", dp_overlap=True)
    assert e.value.key == "strategy.dp_overlap"
    with pytest.raises(ConfigError) as e:
        HybridConfig(dp=2, dp_overlap=True, bucket_mb=0)
    assert e.value.key == "strategy.bucket_mb"
    with pytest.raises(ConfigError) as e:
        HybridConfig(balance="random")
    assert e.value.key == "strategy.balance"


def test_bert_dims_and_validation():
    transformers = pytest.importorskip("transformers")
    from dsframe.models.bert import BertClassifier

    enc = transformers.BertModel(transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=64),
                                 add_pooling_layer=False)
    model = BertClassifier(enc, num_labels=2)
    assert model.tp_divisible() == {"model.hf_config.num_attention_heads": 4,
                                    "model.hf_config.intermediate_size": 64}
    assert model.pipeline_units() == ["0", "1"]
    f = HybridStrategyFactory()
    f.validate(HybridConfig(tp=4), 4, model, 8)   # vocab 101, hidden 32: not split
    f.validate(HybridConfig(pp=2, tp=2, micro_batches=2), 4, model, 8)
    with pytest.raises(ConfigError) as e:
        f.validate(HybridConfig(tp=8), 8, model, 8)
    assert e.value.key == "model.hf_config.num_attention_heads"
    with pytest.raises(ConfigError) as e:
        f.validate(HybridConfig(pp=4, micro_batches=4), 4, model, 8)   # 2 layers
    assert e.value.key == "model.n_layer"
    with pytest.raises(ConfigError, match="no sequence-parallel plan") as e:
        f.validate(HybridConfig(tp=2, sequence_parallel=True), 2, model, 8)
    assert e.value.key == "strategy.sequence_parallel"


def test_pipeline_rejects_plugins_with_a_loss_term_before_launch():
    from dsframe import Plugin
    from dsframe.errors import ConfigError
    from dsframe.parallel.factory import HybridConfig, HybridStrategyFactory

    class AddsLoss(Plugin):
        name = "adds_loss"

        def loss(self, task, batch, outputs, loss):
            return loss

    class Watches(Plugin):
        name = "watches"

    factory = HybridStrategyFactory()
    factory.validate_plugins(HybridConfig(pp=2, micro_batches=2), [Watches()])
    factory.validate_plugins(HybridConfig(tp=2), [AddsLoss()])
    with pytest.raises(ConfigError, match="strategy.pp=2 .*adds_loss"):
        factory.validate_plugins(HybridConfig(pp=2, micro_batches=2), [AddsLoss(), Watches()])
