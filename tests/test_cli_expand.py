"""Command-line conveniences: appending to a stage's plugin list, and any installed plugin's options
addressed as plugins.NAME.KEY=V whether or not the recipe configures it."""
import pytest

from dsframe.config import validate
from dsframe.precheck import expand_args
from tests.conftest import run_cli


def test_append_to_a_stage_plugins_keeps_the_listed_ones():
    args = ["recipe=bert_compress", "recipe.stages.prune.plugins+=[qat]"]
    assert expand_args(args) == ["recipe=bert_compress", "recipe.stages.prune.plugins=[prune,distill,qat]"]


def test_options_of_a_plugin_the_recipe_does_not_configure_load_its_yaml(compose):
    args = expand_args(["recipe=sentiment", "recipe.stages.finetune.plugins+=[prune]", "plugins.prune.amount=0.3"])
    assert args == ["+plugins=prune", "recipe=sentiment", "recipe.stages.finetune.plugins=[prune]",
                    "plugins.prune.amount=0.3"]
    spec = validate(compose(*args))
    assert spec.plugins["prune"].amount == 0.3
    assert spec.plugins["prune"].end_fraction == 0.6  # from prune.yaml, not only the dataclass
    assert spec.recipe.stages["finetune"].plugins == ["prune"]


def test_configured_plugins_and_plain_args_are_left_alone():
    for args in (["recipe=bert_compress", "plugins.prune.amount=0.3"], ["recipe=sentiment", "seed=3"]):
        assert expand_args(args) == args


def test_a_plugin_without_yaml_falls_back_to_its_dataclass(compose):
    from dsframe.errors import ConfigError

    args = expand_args(["recipe=sentiment", "plugins.nosuch.x=1"])
    assert args == ["recipe=sentiment", "+plugins.nosuch.x=1"]
    with pytest.raises(ConfigError, match="plugins.nosuch"):
        validate(compose(*args))


def test_appending_to_a_non_list_is_one_line(tmp_path):
    proc = run_cli("recipe=sentiment", "seed+=[1]", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "dsframe: error: seed is not a list, so seed+=[1] cannot append to it"


@pytest.mark.slow
def test_cli_adds_a_plugin_to_a_stage_and_sets_its_options(tmp_path):
    proc = run_cli("recipe=sentiment", "debug=tiny", "trainer.limit_train_batches=2",
                   "recipe.stages.finetune.plugins+=[prune]", "plugins.prune.amount=0.5",
                   "plugins.prune.end_fraction=1.0", "plugins.prune.every_n_steps=1", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from omegaconf import OmegaConf

    from dsframe.models.files import load_model

    cfg = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert cfg.plugins.prune.amount == 0.5 and cfg.plugins.prune.taylor_decay == 0.9  # set + from prune.yaml
    assert cfg.plugins.prune.drop_layers == 0  # the debug preset still wins over the YAML

    heads = load_model(tmp_path / "run" / "finetune" / "model.pt").arch()["heads"]
    assert heads == [2, 2]  # the tiny model's 4 heads per layer, half pruned: the plugin really ran
