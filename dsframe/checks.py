"""Range checks for ``Config`` dataclasses (``__post_init__``), each failure one ConfigError naming
``<prefix>.<key>``. No torch here: config modules that use them stay quick to import."""
from __future__ import annotations

from typing import Any, Iterable

from dsframe.errors import ConfigError


def integers_at_least(cfg: Any, prefix: str, keys: Iterable[str], low: int = 1) -> None:
    """Each ``cfg.<key>`` is an integer >= ``low``."""
    for key in keys:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{prefix}.{key}", value, f"an integer >= {low}")


def unit_fractions(cfg: Any, prefix: str, keys: Iterable[str]) -> None:
    """Each ``cfg.<key>`` is a float in [0, 1) (dropout rates, ratios)."""
    for key in keys:
        value = getattr(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{prefix}.{key}", value, "a float in [0, 1)")
