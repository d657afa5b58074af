"""Experiment loggers next to the CSV logs every fit stage keeps (``logger=csv|tensorboard|mlflow``).

The runner always writes ``<stage>/logs/fit/metrics.csv`` (its curves and tests read it); the logger
group adds one more Lightning logger to every fit segment:

* ``logger=tensorboard``: event files in ``<stage>/logs/tensorboard/<segment>/``
  (``tensorboard --logdir outputs``); needs ``tensorboard`` or ``tensorboardX``;
* ``logger=mlflow``: one MLflow run per fit segment in the experiment named after the recipe, stored
  in ``<run dir>/mlflow.db`` (SQLite; MLflow 3 refuses its old ``mlruns`` file store) unless
  ``logger.tracking_uri`` says where; needs ``mlflow`` (or ``mlflow-skinny``) and SQLAlchemy.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Optional

from dsframe.errors import ConfigError

KINDS = ("csv", "tensorboard", "mlflow")
_NEEDS = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}
_ALSO = {"mlflow": ("sqlalchemy",)}  # its default store (SQLite) goes through SQLAlchemy


@dataclass
class LoggerConfig:
    kind: str = "csv"
    tracking_uri: Optional[str] = None  # mlflow: where runs are stored (null: sqlite:///<run dir>/mlflow.db)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError("logger.kind", self.kind, f"one of {', '.join(KINDS)}")
        needs = _NEEDS.get(self.kind, ())
        if needs and not any(find_spec(m) for m in needs):
            raise ConfigError("logger.kind", self.kind, f"an installed logger: {self.kind} needs the package "
                              f"{' or '.join(needs)} (pip install {needs[-1]}), or logger=csv")
        missing = [m for m in _ALSO.get(self.kind, ()) if self.tracking_uri is None and not find_spec(m)]
        if missing:
            raise ConfigError("logger.kind", self.kind, f"an installed logger: {self.kind}'s default store needs "
                              f"{', '.join(missing)} (pip install {missing[0]}), or a logger.tracking_uri")


def extra_loggers(config: Optional[LoggerConfig], stage_dir: Path, version: str, recipe: str) -> list[Any]:
    """The Lightning loggers a fit segment gets besides its CSVLogger (``version``: fit, fit-1, ...)."""
    kind = config.kind if config is not None else "csv"
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return [TensorBoardLogger(save_dir=stage_dir / "logs", name="tensorboard", version=version,
                                  default_hp_metric=False)]
    if kind == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        uri = config.tracking_uri or f"sqlite:///{(stage_dir.parent / 'mlflow.db').resolve()}"
        return [MLFlowLogger(experiment_name=recipe, run_name=f"{stage_dir.name}/{version}", tracking_uri=uri)]
    return []
