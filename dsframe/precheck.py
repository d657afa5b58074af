"""Name the allowed keys when a command-line override targets a key that does not exist.

Hydra rejects ``trainer.max_epoch=3`` itself ("Key 'max_epoch' is not in struct") before
dsframe sees the config; this check composes the chosen groups first and, for that one
mistake, says which keys the node does have.
"""
from __future__ import annotations

import re
from typing import Optional


def unknown_key_message(args: list[str]) -> Optional[str]:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        overrides = OverridesParser.create().parse_overrides([args[i] for i in _override_positions(args)])
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
            base = compose("config", overrides=[o.input_line for o in groups])
        for o in keys:
            parts = o.key_or_group.split(".")
            for depth in range(1, len(parts)):  # the first missing key under an existing mapping
                parent, leaf = ".".join(parts[:depth]), parts[depth]
                node = OmegaConf.select(base, parent)
                if node is None or not OmegaConf.is_dict(node):
                    break
                if leaf not in node:
                    allowed = ", ".join(str(k) for k in node.keys())
                    return (f"{parent}.{leaf} is not a key of '{parent}' (override {o.input_line}); "
                            f"allowed keys: {allowed}. To add a new key on purpose: +{o.input_line}")
    except Exception:  # anything else is Hydra's to report, with its own message
        return None
    finally:
        GlobalHydra.instance().clear()
    return None


# Hydra's flags that take the next word as their value (``--cfg job``, ``-p plugins``)
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _override_positions(args: list[str]) -> list[int]:
    """Indices of the overrides among the command-line words (not flags, nor a flag's value)."""
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _VALUE_FLAGS or (a in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in _INFO_VALUES)
        else:
            out.append(i)
    return out


_APPEND = re.compile(r"^(?P<key>[A-Za-z_][\w.]*)\+=(?P<value>.*)$")


def expand_args(args: list[str]) -> list[str]:
    """Two conveniences Hydra lacks, rewritten into plain overrides before Hydra sees them:

    * ``KEY+=[a,b]`` appends to the list at KEY, e.g. ``recipe.stages.finetune.plugins+=[scheduler]``
      adds a plugin to a stage without re-listing the ones it has;
    * ``plugins.NAME.KEY=V`` for an installed plugin the recipe does not configure loads that
      plugin's shipped options first (``+plugins=NAME``, from any package's ``conf/plugins/NAME.yaml``),
      so outside plugins are addressed exactly like first-party ones; a plugin without a YAML file
      gets ``+plugins.NAME.KEY=V`` (its ``Config`` defaults fill the rest).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    appends = {i: m for i, a in enumerate(args) if (m := _APPEND.match(a))}
    plugin_keys = [a for a in args if re.match(r"^plugins\.\w+\.", a)]
    if not appends and not plugin_keys:
        return args
    parser = OverridesParser.create()
    try:
        plain = [args[i] for i in _override_positions(args) if i not in appends]
        groups = [o for o in parser.parse_overrides(plain)
                  if "." not in o.key_or_group and not o.is_sweep_override() and not o.is_hydra_override()]
    except Exception:  # malformed: Hydra reports it itself
        return args
    group_lines = [o.input_line for o in groups if not o.is_add()]
    base, options = _compose_with_options(group_lines)
    if base is None:
        return args
    wanted: list[str] = []
    out = list(args)
    for i, m in appends.items():
        key = m["key"]
        current = OmegaConf_select(base, key)
        if current is None:
            current = []
        try:
            added = parser.parse_override(f"{key}={m['value']}").value()
        except Exception:
            raise SystemExit(f"dsframe: error: cannot read the list in {args[i]} (expected KEY+=[a,b])")
        if not isinstance(current, list):
            raise SystemExit(f"dsframe: error: {key} is not a list, so {args[i]} cannot append to it")
        added = list(added) if isinstance(added, list) else [added]
        out[i] = f"{key}=[{','.join(str(x) for x in [*current, *added])}]"
        if key.startswith("recipe.stages.") and key.endswith(".plugins"):
            wanted += [str(x) for x in added]
    wanted += [a.split(".")[1] for a in plugin_keys if not a.startswith("+")]
    missing = [n for n in dict.fromkeys(wanted) if not _yaml_loaded(base, n, options, group_lines)]
    with_yaml = [n for n in missing if n in options]
    out = [f"+plugins={n}" for n in with_yaml] + out
    without = set(missing) - set(with_yaml) - set((base.get("plugins") or {}).keys())
    return [f"+{a}" if re.match(r"^plugins\.(\w+)\.", a) and a.split(".")[1] in without else a for a in out]


def _yaml_loaded(base, name: str, options: set, group_lines: list[str]) -> bool:
    """Whether the composed config already holds every option of plugin ``name``'s YAML file (the
    recipe lists it); a preset may hold a few of its keys without the file (debug=tiny does)."""
    node = (base.get("plugins") or {}).get(name)
    if name not in options:
        return node is not None
    if node is None:
        return False
    with_file, _ = _compose_with_options([f"+plugins={name}", *group_lines])
    return with_file is None or set(with_file.plugins[name].keys()) <= set(node.keys())


def OmegaConf_select(cfg, key):  # noqa: N802 - a list comes back as a plain list
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _compose_with_options(group_overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("dsframe.conf", version_base="1.3"):
            base = compose("config", overrides=group_overrides)
            options = set(GlobalHydra.instance().config_loader().get_group_options("plugins"))
        return base, options
    except Exception:
        return None, set()
    finally:
        GlobalHydra.instance().clear()
