"""Config validation: good configs pass, bad ones fail before training with key, value, allowed."""
import pytest

from dsframe.config import validate
from dsframe.errors import ConfigError


def test_default_config_validates(compose):
    spec = validate(compose())
    assert spec.recipe.name == "sentiment"
    assert list(spec.recipe.stages) == ["finetune"]
    assert spec.trainer.max_epochs == 2  # the recipe's value wins over trainer/default.yaml
    assert spec.model.name_or_path == "minilm" and spec.data.tokenizer == "minilm"


def test_stage_trainer_overrides_merge(compose):
    spec = validate(compose("recipe=sentiment", "+recipe.stages.finetune.trainer.max_epochs=5"))
    assert spec.stage_trainer("finetune").max_epochs == 5
    assert spec.trainer.max_epochs == 2


@pytest.mark.parametrize("override, key, allowed", [
    ("trainer.max_epochs=-1", "trainer.max_epochs", "integer >= 1"),
    ("trainer.precision=8-bit", "trainer.precision", "bf16-mixed"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches", "fraction"),
    ("trainer.devices=two", "trainer.devices", "int"),
    ("data.val_fraction=0.9", "data.val_fraction", "(0, 0.5)"),
    ("model.kind=resnet", "model.kind", "bert"),
    ("model.pooling=max", "model.pooling", "mean"),
    ("strategy.start_method=thread", "strategy.start_method", "fork"),
    ("optim.lr=0", "optim.lr", "> 0"),
    ("+recipe.stages.finetune.plugins=[no_such_plugin]", "recipe.stages.finetune.plugins", "one of"),
    ("+recipe.stages.finetune.init_from=later", "recipe.stages.finetune.init_from", "an earlier stage"),
    ("+recipe.stages.finetune.run=no_such_stage", "recipe.stages.finetune.run", "one of"),
    ("+plugins.no_such_plugin.x=1", "plugins.no_such_plugin", "one of"),
    ("+trainer.max_epoch=3", "trainer.max_epoch", "max_epochs"),
    ("+surprise=1", "surprise", "recipe"),
])
def test_bad_values_name_key_value_and_allowed(compose, override, key, allowed):
    if override.startswith("strategy."):
        cfg = compose("strategy=ddp", override)
    else:
        cfg = compose(override)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    err = info.value
    assert err.key == key
    assert allowed in err.allowed
    assert key in str(err)


def test_unknown_override_key_is_rejected_at_compose(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        compose("trainer.max_epoch=3")
