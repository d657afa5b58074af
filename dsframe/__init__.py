"""dsframe: a plugin-based training framework on PyTorch Lightning and Hydra.

The public API for plugin and recipe authors is what this module exports. Names load on
first use so that ``python -m dsframe --help`` does not pay for importing Lightning.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DsframeError": "dsframe.errors", "ConfigError": "dsframe.errors", "CheckpointError": "dsframe.errors",
    "Plugin": "dsframe.plugin", "StageContext": "dsframe.plugin", "NoOptions": "dsframe.plugin",
    "StrategyFactory": "dsframe.strategies",
    "save_model": "dsframe.models.files", "load_model": "dsframe.models.files",
    "batch_size": "dsframe.batch", "call_model": "dsframe.batch", "model_inputs": "dsframe.batch",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsframe' has no attribute {name!r}")
