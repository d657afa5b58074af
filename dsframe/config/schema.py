"""Schemas of the run config. Component groups (model, data, strategy, plugins) are checked
against the ``Config`` dataclass of the component their ``kind`` (or name) selects."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from dsframe import registry
from dsframe.config.structured import to_dataclass
from dsframe.errors import ConfigError
from dsframe.loggers import LoggerConfig
from dsframe.optim import TASK_KINDS as TASKS, OptimConfig  # no torch/Lightning: fast config errors
from dsframe.resilience_config import CheckpointConfig, NonFiniteLossConfig

ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


@dataclass
class TrainerConfig:
    """The subset of ``lightning.Trainer`` arguments a recipe may set."""

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: int = 1
    max_steps: int = -1
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    val_check_interval: Any = 1.0
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    log_every_n_steps: int = 10
    num_sanity_val_steps: int = 0
    reload_dataloaders_every_n_epochs: int = 0
    deterministic: bool = False
    enable_progress_bar: bool = True

    def __post_init__(self):
        if self.accelerator not in ACCELERATORS:
            raise ConfigError("trainer.accelerator", self.accelerator, f"one of {', '.join(ACCELERATORS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError("trainer.precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        for key in ("devices", "num_nodes", "max_epochs", "accumulate_grad_batches", "log_every_n_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}", getattr(self, key), "an integer >= 1")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError("trainer.max_steps", self.max_steps, "-1 (no limit) or an integer >= 1")
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "val_check_interval"):
            _check_fraction_or_count(f"trainer.{key}", getattr(self, key))
        if self.val_check_interval == 0:  # Lightning divides by it
            raise ConfigError("trainer.val_check_interval", self.val_check_interval,
                              "a fraction in (0.0, 1.0] of an epoch or a whole number of batches >= 1")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ConfigError("trainer.gradient_clip_val", self.gradient_clip_val, "null or a float > 0")
        if self.num_sanity_val_steps < -1 or self.reload_dataloaders_every_n_epochs < 0:
            bad = "num_sanity_val_steps" if self.num_sanity_val_steps < -1 else "reload_dataloaders_every_n_epochs"
            raise ConfigError(f"trainer.{bad}", getattr(self, bad), "an integer >= 0")


def _check_fraction_or_count(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "a fraction in [0, 1] or a whole number of batches")
    if isinstance(value, float) and not 0.0 <= value <= 1.0 or isinstance(value, int) and value < 0:
        raise ConfigError(key, value, "a fraction in [0.0, 1.0] or a whole number of batches >= 0")


@dataclass
class StageConfig:
    """One stage of a recipe: a training run (``run: fit``) or a registered stage function."""

    run: str = "fit"
    description: str = ""
    plugins: List[str] = field(default_factory=list)
    init_from: Optional[str] = None  # an earlier stage whose model.pt starts this one
    trainer: Dict[str, Any] = field(default_factory=dict)  # overrides of the top-level trainer
    optim: Dict[str, Any] = field(default_factory=dict)  # overrides of the top-level optim
    # overrides of the top-level model, deep-merged (lists replace): e.g. one recipe trains
    # unimodal baselines with {modalities: [image]}; the kind stays the top-level one
    model: Dict[str, Any] = field(default_factory=dict)
    test: bool = True  # evaluate the finished model on the test split
    options: Dict[str, Any] = field(default_factory=dict)  # free arguments for a stage function


@dataclass
class RecipeConfig:
    name: str = "???"
    description: str = ""
    task: str = "classification"
    stages: Dict[str, StageConfig] = field(default_factory=dict)
    # what a sweep's summary shows: {figures: [metric keys], fronts: [{x, y, x_goal, y_goal}]}
    summary: Dict[str, Any] = field(default_factory=dict)
    # what a search optimises / a sweep's best job: {metrics, directions, weights, constraints}
    objective: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from dsframe.sweep import parse_objective

        if self.task not in TASKS:
            raise ConfigError("recipe.task", self.task, f"one of {', '.join(TASKS)}")
        _check_summary(self.summary)
        parse_objective(self.objective)
        if not self.stages:
            raise ConfigError("recipe.stages", {}, "at least one stage")


def _check_summary(summary: Dict[str, Any]) -> None:
    for key in summary:
        if key not in ("figures", "fronts"):
            raise ConfigError(f"recipe.summary.{key}", summary[key], "a key of 'recipe.summary': figures, fronts")
    figures = summary.get("figures") or []
    if not isinstance(figures, list) or not all(isinstance(f, str) for f in figures):
        raise ConfigError("recipe.summary.figures", figures, "a list of metric names (e.g. report.final_acc)")
    fronts = summary.get("fronts") or []
    if not isinstance(fronts, list):
        raise ConfigError("recipe.summary.fronts", fronts, "a list of {x, y, x_goal, y_goal}")
    for i, front in enumerate(fronts):
        where = f"recipe.summary.fronts.{i}"
        if not isinstance(front, dict) or not {"x", "y"} <= set(front) or set(front) - {"x", "y", "x_goal", "y_goal"}:
            raise ConfigError(where, front, "a mapping with x, y (metric names) and optional x_goal, y_goal")
        for goal in ("x_goal", "y_goal"):
            if front.get(goal, "max") not in ("max", "min"):
                raise ConfigError(f"{where}.{goal}", front[goal], "max or min")


@dataclass
class RunSpec:
    """The validated run: typed configs for every group, plus the resolved tree for the record."""

    cfg: DictConfig
    recipe: RecipeConfig
    model: Any
    data: Any
    trainer: TrainerConfig
    strategy: Any
    optim: OptimConfig
    plugins: Dict[str, Any]  # plugin name -> its checked Config
    seed: int
    threads: Optional[int]
    logger: Any = None  # dsframe.loggers.LoggerConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    nonfinite_loss: NonFiniteLossConfig = field(default_factory=NonFiniteLossConfig)

    def stage_trainer(self, stage: str, segment: Optional[Dict[str, Any]] = None) -> TrainerConfig:
        """The stage's trainer settings; ``segment`` holds a later segment's changes to them."""
        base = OmegaConf.to_container(OmegaConf.structured(self.trainer))
        with _stage_key(stage, "trainer"):
            return to_dataclass(TrainerConfig, {**base, **self.recipe.stages[stage].trainer, **(segment or {})},
                                f"recipe.stages.{stage}.trainer")

    def stage_optim(self, stage: str) -> OptimConfig:
        base = OmegaConf.to_container(OmegaConf.structured(self.optim))
        with _stage_key(stage, "optim"):
            return to_dataclass(OptimConfig, {**base, **self.recipe.stages[stage].optim},
                                f"recipe.stages.{stage}.optim")

    def stage_model(self, stage: str) -> Any:
        """The model config of ``stage``: its ``model`` overrides merged onto the top-level model."""
        overrides = self.recipe.stages[stage].model
        if not overrides:
            return self.model
        where = f"recipe.stages.{stage}.model"
        if "kind" in overrides and overrides["kind"] != self.model.kind:
            raise ConfigError(f"{where}.kind", overrides["kind"],
                              f"'{self.model.kind}' (the top-level model.kind): a stage changes a model's "
                              "options, not its kind")
        merged = _deep_merge(OmegaConf.to_container(OmegaConf.structured(self.model)), overrides)
        with _stage_key(stage, "model"):
            return to_dataclass(type(self.model), merged, where)


def _deep_merge(base: Any, override: Any) -> Any:
    """``override`` onto ``base``: mappings merge key by key, anything else replaces. A mapping
    whose ``kind`` changes is replaced whole: its kind selects another schema (e.g. an encoder)."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    if "kind" in override and override["kind"] != base.get("kind", override["kind"]):
        return dict(override)
    return {**base, **{k: _deep_merge(base.get(k), v) if k in base else v for k, v in override.items()}}


@contextmanager
def _stage_key(stage: str, group: str):
    """A group's Config names its keys '<group>.<key>' (e.g. 'trainer.devices'); inside a stage
    override the key to blame is 'recipe.stages.<stage>.<group>.<key>'."""
    where = f"recipe.stages.{stage}.{group}"
    try:
        yield
    except ConfigError as exc:
        key = exc.key.replace(f"{where}.{group}.", f"{where}.", 1)
        if key.startswith(f"{group}."):
            key = f"{where}.{key[len(group) + 1:]}"
        raise ConfigError(key, exc.value, exc.allowed) from None


TOP_KEYS = ("recipe", "model", "data", "trainer", "strategy", "optim", "plugins", "seed", "threads", "logger",
            "checkpoint", "nonfinite_loss")


def component_config(reg: registry.Registry, node: Any, key: str) -> Any:
    """Check a group whose ``kind`` selects the component (and so the schema)."""
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else (node or {})
    kind = node.get("kind")
    if kind is None:
        raise ConfigError(f"{key}.kind", None, f"one of {', '.join(reg.installed())}")
    return to_dataclass(reg.config_class(kind, key=f"{key}.kind"), node, key)


def validate(cfg: DictConfig) -> RunSpec:
    """Check the whole composed config before anything runs; raises ConfigError on the first problem."""
    for key in cfg:
        if key not in TOP_KEYS:
            raise ConfigError(str(key), cfg[key], f"a top-level key: {', '.join(TOP_KEYS)}")
    recipe = to_dataclass(RecipeConfig, cfg.get("recipe"), "recipe")
    trainer = to_dataclass(TrainerConfig, cfg.get("trainer"), "trainer")
    optim = to_dataclass(OptimConfig, cfg.get("optim"), "optim")
    # the torch-free groups before the components, whose schemas live beside torch code: a wrong
    # scalar is reported without importing torch
    seed, threads = _int(cfg, "seed", 42), _threads(cfg)
    logger = to_dataclass(LoggerConfig, cfg.get("logger") or {}, "logger")
    checkpoint = to_dataclass(CheckpointConfig, cfg.get("checkpoint"), "checkpoint")
    nonfinite_loss = to_dataclass(NonFiniteLossConfig, cfg.get("nonfinite_loss"), "nonfinite_loss")
    plugin_nodes = cfg.get("plugins") or {}
    if isinstance(plugin_nodes, DictConfig):
        plugin_nodes = OmegaConf.to_container(plugin_nodes, resolve=True)
    plugins: Dict[str, Any] = {}
    for name, node in plugin_nodes.items():
        plugins[name] = to_dataclass(registry.plugins.config_class(name, key=f"plugins.{name}"), node,
                                     f"plugins.{name}")
    spec = RunSpec(cfg=cfg, recipe=recipe,
                   model=component_config(registry.models, cfg.get("model"), "model"),
                   data=component_config(registry.data, cfg.get("data"), "data"),
                   trainer=trainer,
                   strategy=component_config(registry.strategies, cfg.get("strategy"), "strategy"),
                   optim=optim, plugins=plugins, seed=seed, threads=threads, logger=logger, checkpoint=checkpoint,
                   nonfinite_loss=nonfinite_loss)
    seen: list[str] = []
    for name, stage in recipe.stages.items():
        where = f"recipe.stages.{name}"
        if stage.run != "fit":
            registry.stages.require(stage.run, key=f"{where}.run")
        if stage.init_from is not None and stage.init_from not in seen:
            raise ConfigError(f"{where}.init_from", stage.init_from,
                              f"an earlier stage: {', '.join(seen) or '(none: this is the first stage)'}")
        for plugin in stage.plugins:
            schema = registry.plugins.config_class(plugin, key=f"{where}.plugins")
            if plugin not in spec.plugins:  # no options given: the Config defaults (may be refused)
                spec.plugins[plugin] = to_dataclass(schema, {}, f"plugins.{plugin}")
        stage_trainer = spec.stage_trainer(name)
        spec.stage_optim(name)
        _check_options(stage, where)
        if stage.run == "fit":
            _check_layout(spec, stage_trainer)
        if stage.model and stage.init_from is not None:
            raise ConfigError(f"{where}.model", stage.model,
                              f"no overrides: this stage starts from stage '{stage.init_from}''s model.pt, "
                              "whose architecture is fixed")
        spec.stage_model(name)
        seen.append(name)
    return spec


def _check_options(stage: StageConfig, where: str) -> None:
    """A stage function declares its options as a ``Config`` dataclass (as plugins do); they are
    checked here, so a typo in the last stage's options fails before the first stage trains."""
    if stage.run == "fit":
        if stage.options:
            raise ConfigError(f"{where}.options", stage.options,
                              "no options: a fit stage is configured by plugins, trainer, optim and model")
        return
    schema = registry.stages.config_class(stage.run, key=f"{where}.run")
    if schema is not None:
        try:
            to_dataclass(schema, stage.options, f"{where}.options")
        except ConfigError as exc:  # a schema may name its keys 'options.<key>'
            key = exc.key.replace(f"{where}.options.options.", f"{where}.options.")
            if key.startswith("options."):
                key = f"{where}.{key}"
            raise ConfigError(key, exc.value, exc.allowed) from None


def _check_layout(spec: RunSpec, trainer: TrainerConfig) -> None:
    """The strategy's layout against the world size and the loaders' batch sizes, before any
    model or data is built."""
    factory = registry.strategies.get(spec.strategy.kind, key="strategy.kind")()
    check = getattr(factory, "validate_layout", None)
    if check is None:
        return
    sizes = {f"data.{k}": getattr(spec.data, k) for k in ("batch_size", "eval_batch_size")
             if isinstance(getattr(spec.data, k, None), int)}
    check(spec.strategy, trainer.devices * trainer.num_nodes, sizes)


def _threads(cfg: DictConfig) -> Optional[int]:
    value = cfg.get("threads")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError("threads", value, "null (torch's default) or an integer >= 1")
    return value


def _int(cfg: DictConfig, key: str, default: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, "an integer")
    return value
