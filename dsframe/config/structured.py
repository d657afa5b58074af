"""Turn a config node into a checked dataclass, with errors that name key, value and what is allowed."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from dsframe.errors import ConfigError


def to_dataclass(schema: type, node: Any, prefix: str) -> Any:
    """Merge ``node`` onto ``schema``'s defaults, check types, run ``__post_init__`` range checks."""
    if node is None:
        node = {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        raise ConfigError(prefix, node, f"a mapping with keys {', '.join(_field_names(schema))}")
    allowed = _field_names(schema)
    for key in node:
        if key not in allowed:
            raise ConfigError(_join(prefix, key), node[key], f"a key of '{prefix}': {', '.join(allowed)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except ConfigError as exc:
        raise _prefixed(exc, prefix) from None
    except MissingMandatoryValue as exc:
        raise ConfigError(_join(prefix, exc.full_key), "???", "a value: this key is required") from None
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConfigError):
            raise _prefixed(cause, prefix) from None
        key = getattr(exc, "full_key", None) or ""
        value = _lookup(node, key)
        expected = _expected_type(schema, key)
        raise ConfigError(_join(prefix, key), value, expected or str(exc).splitlines()[0]) from None


def _prefixed(exc: ConfigError, prefix: str) -> ConfigError:
    head = prefix.split(".")[0]
    if exc.key.startswith(prefix + ".") or exc.key.split(".")[0] == head:
        return exc
    return ConfigError(_join(prefix, exc.key), exc.value, exc.allowed)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else (prefix or key)


def _field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _lookup(node: dict, dotted: str) -> Any:
    for part in dotted.split(".") if dotted else []:
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _expected_type(schema: type, dotted: str) -> str | None:
    hints = typing.get_type_hints(schema)
    parts = dotted.split(".") if dotted else []
    if not parts or parts[0] not in hints:
        return None
    hint = hints[parts[0]]
    if len(parts) > 1 and dataclasses.is_dataclass(hint):
        return _expected_type(hint, ".".join(parts[1:]))
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return f"a value of type {name}"
