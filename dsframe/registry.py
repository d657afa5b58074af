"""Named components discovered through entry points.

Every extension point (plugins, models, data, strategies, recipes, stages, encoders) is an
entry-point group ``dsframe.<kind>``. First-party components register exactly the way an
outside package does, in its own ``pyproject.toml``; nothing here knows any of them.

A component's options (its ``Config`` dataclass) may also be registered, under the same name,
in the group ``dsframe.configs.<kind>``, pointing into a module that imports neither torch nor
Lightning: the config is then checked without importing the component (a wrong option is
reported in about a second instead of ten). Without that entry the component itself is imported
and its ``Config`` attribute used.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from dsframe.errors import ConfigError

GROUPS = ("plugins", "models", "data", "strategies", "stages", "encoders")


@dataclass(frozen=True)
class BrokenEntry:
    """An entry point that failed to import: listed with its error, never used."""

    name: str
    target: str
    error: str


class Registry:
    """Loads the entry points of one group, each only when asked for; ``register`` adds
    in-process entries."""

    def __init__(self, kind: str):
        self.kind = kind
        self.group = f"dsframe.{kind}"
        self._imported: dict[str, Any] = {}  # name -> component, or None when its import failed
        self._broken: dict[str, BrokenEntry] = {}
        self._extra: dict[str, Any] = {}
        self._configs: dict[str, Any] = {}
        self._groups: dict[str, dict[str, Any]] = {}

    def _entries(self, group: str) -> dict[str, Any]:
        """name -> entry point of ``group`` (the last one installed wins), read once: each scan of the
        installed packages costs ~10 ms, and checking one config asks ~100 times."""
        if group not in self._groups:
            self._groups[group] = {ep.name: ep for ep in entry_points(group=group)}
        return self._groups[group]

    def register(self, name: str, obj: Any) -> Any:
        self._extra[name] = obj
        return obj

    def installed(self) -> list[str]:
        """Installed and registered names, without importing any component."""
        return sorted(set(self._entries(self.group)) | set(self._extra))

    def _import(self, name: str) -> Any:
        """The installed component ``name``, imported once; None (kept in ``_broken``) if its import fails."""
        if name not in self._imported:
            ep = self._entries(self.group)[name]
            try:
                self._imported[name] = ep.load()
            except Exception as exc:  # any import-time failure of a third-party package
                self._broken[name] = BrokenEntry(name, ep.value, f"{type(exc).__name__}: {exc}")
                self._imported[name] = None
        return self._imported[name]

    def _load(self) -> dict[str, Any]:
        for name in self._entries(self.group):
            self._import(name)
        return {**{n: obj for n, obj in self._imported.items() if obj is not None}, **self._extra}

    def names(self) -> list[str]:
        return sorted(self._load())

    def require(self, name: Any, key: str | None = None) -> None:
        """Raise the ConfigError ``get`` would for a name that is not installed, without importing
        anything (an entry that fails to import is reported when it is used)."""
        known = self.installed()
        if not isinstance(name, str) or name not in known:
            what = "a name: one of" if not isinstance(name, str) else "one of"
            raise ConfigError(key or self.kind, name, f"{what} {', '.join(known) or '(none installed)'}")

    def get(self, name: str, key: str | None = None) -> Any:
        """The component called ``name`` (only it is imported); ``key`` is the config key to blame."""
        self.require(name, key)
        if name in self._extra:
            return self._extra[name]
        component = self._import(name)
        if component is None:
            b = self._broken[name]
            raise ConfigError(key or self.kind, name, f"{self.kind[:-1] if self.kind.endswith('s') else self.kind} "
                              f"'{name}' is installed but failed to import ({b.target}): {b.error}")
        return component

    def has_registered_config(self, name: str) -> bool:
        """Whether ``name``'s Config is registered in ``dsframe.configs.<kind>`` (and imports)."""
        return name not in self._extra and self._registered_config(name) is not None

    def _registered_config(self, name: str) -> Any:
        if name not in self._configs:
            ep = self._entries(f"dsframe.configs.{self.kind}").get(name)
            try:
                self._configs[name] = ep.load() if ep is not None else None
            except Exception:  # get() reports the component's own import error
                self._configs[name] = None
        return self._configs[name]

    def config_class(self, name: str, key: str | None = None) -> Any:
        """The ``Config`` dataclass of component ``name`` (None if it takes no options): from
        ``dsframe.configs.<kind>`` when the package registers it there, else from the component."""
        self.require(name, key)
        schema = self._registered_config(name) if name not in self._extra else None
        return schema if schema is not None else getattr(self.get(name, key), "Config", None)

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line description) for every installed entry: from its registered Config's
        ``description`` when it has one (nothing imported), else from the component, imported (an
        entry that fails to import is then listed by :meth:`broken`)."""
        rows = []
        for name in self.installed():
            doc = None if name in self._extra else getattr(self._registered_config(name), "description", None)
            if doc is None:
                obj = self._extra[name] if name in self._extra else self._import(name)
                if obj is None:
                    continue
                doc = getattr(obj, "description", None) or (getattr(obj, "__doc__", None) or "").strip()
            rows.append((name, doc.splitlines()[0] if doc else ""))
        return rows

    def broken(self) -> list[BrokenEntry]:
        """The entries that failed to import so far (``describe`` imports those it must)."""
        return [b for n, b in sorted(self._broken.items()) if n not in self._extra]


plugins = Registry("plugins")
models = Registry("models")
data = Registry("data")
strategies = Registry("strategies")
stages = Registry("stages")
encoders = Registry("encoders")  # one modality's input -> tokens (used by multimodal models)

ALL = {r.kind: r for r in (plugins, models, data, strategies, stages, encoders)}
