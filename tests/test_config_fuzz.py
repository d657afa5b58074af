"""Property-based check of the config validator: whatever value lands on whatever key of a real
recipe's config, validation either accepts it or raises one ConfigError naming that key; never a
TypeError, ZeroDivisionError or any other traceback."""
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from omegaconf import OmegaConf

from dsframe.config import validate
from dsframe.errors import ConfigError

RECIPES = {
    "sentiment": ("recipe=sentiment",),
    "bert_compress": ("recipe=bert_compress",),
    "hybrid": ("recipe=lm_hybrid_parallel",),
    "ddp": ("recipe=sentiment", "strategy=ddp"),
}

BAD_VALUES = st.one_of(
    st.text(max_size=6),
    st.integers(min_value=-10**6, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "kind", "x"]), st.integers(0, 3), max_size=2),
)


def _leaves(node, prefix=""):
    if OmegaConf.is_dict(node):
        for key in node:
            yield from _leaves(node._get_node(key), f"{prefix}.{key}" if prefix else str(key))
    elif OmegaConf.is_list(node):
        yield prefix
    else:
        yield prefix


@pytest.fixture(scope="module")
def composed():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import dsframe.cli  # noqa: F401  registers the run-dir resolver

    GlobalHydra.instance().clear()
    with initialize_config_module("dsframe.conf", version_base="1.3"):
        cfgs = {name: compose("config", overrides=list(ov)) for name, ov in RECIPES.items()}
    GlobalHydra.instance().clear()
    for cfg in cfgs.values():
        validate(cfg)  # the unmodified recipes are valid
    return {name: (OmegaConf.to_container(cfg, resolve=True), sorted(_leaves(cfg))) for name, cfg in cfgs.items()}


# derandomized: the same 150 examples on every run, so CI is reproducible; explore further with
# max_examples raised and derandomize off (4,500 examples over three seeds passed when written)
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_on_any_key_is_accepted_or_one_config_error(composed, data):
    recipe = data.draw(st.sampled_from(sorted(composed)), label="recipe")
    container, keys = composed[recipe]
    key = data.draw(st.sampled_from(keys), label="key")
    value = data.draw(BAD_VALUES, label="value")
    cfg = OmegaConf.create(container)
    OmegaConf.update(cfg, key, value, merge=False)
    try:
        validate(cfg)
    except ConfigError as err:
        assert "\n" not in str(err)
        # the error names the key that was changed, or the node / stage it belongs to; a constraint
        # between two keys (batch size vs micro-batches) may be reported on the other key, but its
        # message must then name the changed one
        top = key.split(".")[0]
        assert (
            err.key.split(".")[0] == top or key.startswith(err.key) or err.key.startswith(key) or key in str(err)
        ), (key, str(err))
    # no other exception type may escape


def test_nan_learning_rate_is_rejected(composed):
    container, _ = composed["sentiment"]
    cfg = OmegaConf.create(container)
    OmegaConf.update(cfg, "optim.lr", math.nan, merge=False)
    with pytest.raises(ConfigError, match="optim.lr"):
        validate(cfg)
