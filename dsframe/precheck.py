"""Name the allowed keys when a command-line override targets a key that does not exist.

Hydra rejects ``trainer.max_epoch=3`` itself ("Key 'max_epoch' is not in struct") before
dsframe sees the config; this check composes the chosen groups first and, for that one
mistake, says which keys the node does have.
"""
from __future__ import annotations

from typing import Optional


def unknown_key_message(args: list[str]) -> Optional[str]:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # a malformed override: Hydra reports it itself
        return None
    overrides = [o for o in overrides if not o.is_hydra_override() and o.package is None]
    groups = [o for o in overrides if "." not in o.key_or_group]
    keys = [o for o in overrides if "." in o.key_or_group and not (o.is_add() or o.is_force_add() or o.is_delete())]
    if not keys or any(o.is_sweep_override() for o in groups):
        return None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("dsframe.conf", version_base="1.3"):
            base = compose("config", overrides=[o.input_line for o in groups if not o.is_add()])
        for o in keys:
            parent, _, leaf = o.key_or_group.rpartition(".")
            node = OmegaConf.select(base, parent)
            if node is not None and OmegaConf.is_dict(node) and leaf not in node:
                allowed = ", ".join(str(k) for k in node.keys())
                return (f"{o.key_or_group} is not a key of '{parent}' (override {o.input_line}); "
                        f"allowed keys: {allowed}. To add a new key on purpose: +{o.input_line}")
    except Exception:  # anything else is Hydra's to report, with its own message
        return None
    finally:
        GlobalHydra.instance().clear()
    return None
