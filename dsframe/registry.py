"""Named components discovered through entry points.

Every extension point (plugins, models, data, strategies, recipes, stages, encoders) is an
entry-point group ``dsframe.<kind>``. First-party components register exactly the way an
outside package does, in its own ``pyproject.toml``; nothing here knows any of them.
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
    """Lazily loads the entry points of one group; ``register`` adds in-process entries."""

    def __init__(self, kind: str):
        self.kind = kind
        self.group = f"dsframe.{kind}"
        self._loaded: dict[str, Any] | None = None
        self._broken: dict[str, BrokenEntry] = {}
        self._extra: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> Any:
        self._extra[name] = obj
        return obj

    def _load(self) -> dict[str, Any]:
        if self._loaded is None:
            loaded: dict[str, Any] = {}
            for ep in entry_points(group=self.group):
                try:
                    loaded[ep.name] = ep.load()
                except Exception as exc:  # any import-time failure of a third-party package
                    self._broken[ep.name] = BrokenEntry(ep.name, ep.value, f"{type(exc).__name__}: {exc}")
            self._loaded = loaded
        return {**self._loaded, **self._extra}

    def names(self) -> list[str]:
        return sorted(self._load())

    def broken(self) -> list[BrokenEntry]:
        self._load()
        return [b for n, b in sorted(self._broken.items()) if n not in self._extra]

    def get(self, name: str, key: str | None = None) -> Any:
        """The component called ``name``; ``key`` is the config key to blame if it is unknown."""
        available = self._load()
        if not isinstance(name, str):
            raise ConfigError(key or self.kind, name, f"a name: one of {', '.join(sorted(available)) or '(none installed)'}")
        if name in available:
            return available[name]
        key = key or self.kind
        if name in self._broken:
            b = self._broken[name]
            raise ConfigError(key, name, f"{self.kind[:-1] if self.kind.endswith('s') else self.kind} "
                              f"'{name}' is installed but failed to import ({b.target}): {b.error}")
        raise ConfigError(key, name, f"one of {', '.join(sorted(available)) or '(none installed)'}")

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line description) for every loadable entry."""
        rows = []
        for name, obj in sorted(self._load().items()):
            doc = getattr(obj, "description", None) or (getattr(obj, "__doc__", None) or "").strip()
            rows.append((name, doc.splitlines()[0] if doc else ""))
        return rows


plugins = Registry("plugins")
models = Registry("models")
data = Registry("data")
strategies = Registry("strategies")
stages = Registry("stages")
encoders = Registry("encoders")  # one modality's input -> tokens (used by multimodal models)

ALL = {r.kind: r for r in (plugins, models, data, strategies, stages, encoders)}
