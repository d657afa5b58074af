"""``strategy=hybrid``: the config schema, the pre-launch validation and the Lightning strategy.

Registered as ``hybrid = "dsframe.parallel.factory:HybridStrategyFactory"`` in the entry-point
group ``dsframe.strategies``. ``validate`` runs in the launching process, before any rank starts,
so an impossible layout costs one line of error, not a hung process group.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Optional

from dsframe.errors import ConfigError
from dsframe.parallel.layout import ParallelDims
from dsframe.strategies import LaunchConfig, StrategyFactory

DP_MODES = ("allreduce", "fsdp")
BALANCE = ("flops", "measured", "uniform")


@dataclass
class HybridConfig(LaunchConfig):
    kind: str = "hybrid"
    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1
    schedule: str = "1f1b"                  # gpipe | 1f1b | interleaved_1f1b | interleaved_zb | zbv | dualpipev
    dp_mode: str = "allreduce"              # allreduce (DDP-style gradient all-reduce) | fsdp (FSDP2)
    hierarchical_allreduce: bool = False    # reduce in node → all-reduce across nodes → broadcast in node
    sequence_parallel: bool = False         # shard LayerNorms / residual stream along the sequence (pp=1)
    ranks_per_node: Optional[int] = None    # null: LOCAL_WORLD_SIZE / devices
    balance: str = "flops"                  # pipeline stage costs: flops | measured | uniform
    dp_overlap: bool = False                # dp all-reduce in buckets started during backward (as DDP)
    bucket_mb: float = 25.0                 # bucket size of dp_overlap

    def __post_init__(self):
        super().__post_init__()  # backend, start_method, timeout_s
        self.dims()  # sizes, schedule, micro_batches ≥ pp
        if self.dp_mode not in DP_MODES:
            raise ConfigError("strategy.dp_mode", self.dp_mode, f"one of {', '.join(DP_MODES)}")
        if self.sequence_parallel and self.pp > 1:
            raise ConfigError("strategy.sequence_parallel", self.sequence_parallel,
                              "false when pp > 1 (stages pass plain, replicated activations)")
        if self.balance not in BALANCE:
            raise ConfigError("strategy.balance", self.balance, f"one of {', '.join(BALANCE)}")
        if self.dp_overlap and (self.pp > 1 or self.dp_mode != "allreduce"):
            raise ConfigError("strategy.dp_overlap", self.dp_overlap,
                              "false when pp > 1 or dp_mode=fsdp (FSDP2 overlaps its own collectives)")
        if not self.bucket_mb > 0:
            raise ConfigError("strategy.bucket_mb", self.bucket_mb, "a number > 0 (MiB)")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ConfigError("strategy.ranks_per_node", self.ranks_per_node, "null or an integer >= 1")

    def dims(self) -> ParallelDims:
        return ParallelDims(dp=self.dp, tp=self.tp, pp=self.pp, micro_batches=self.micro_batches,
                            schedule=self.schedule)


class HybridStrategyFactory(StrategyFactory):
    name: ClassVar[str] = "hybrid"
    description: ClassVar[str] = ("data × tensor × pipeline parallel on one DeviceMesh (DTensor TP, "
                                  "torch.distributed.pipelining, FSDP2 or hierarchical all-reduce)")
    Config: ClassVar[type] = HybridConfig

    def validate(self, config: HybridConfig, world_size: int, model: Any, batch_size: Optional[int]) -> None:
        """Everything the model must offer comes from the parallel contract (dsframe.parallel.contract)."""
        from dsframe.parallel import contract  # torch: not needed to check a config

        dims = config.dims()
        dims.validate_world(world_size)
        kind = getattr(model, "kind", type(model).__name__)
        if dims.pp > 1 and not contract.supports_pp(model):
            need = ", ".join(contract.missing(model, contract.PP_METHODS))
            raise ConfigError("strategy.pp", dims.pp, f"1: model '{kind}' cannot be cut into pipeline stages "
                                                      f"(it lacks {need} of the parallel contract)")
        if dims.pp > 1 and config.balance == "measured" and contract.missing(model, ("pipeline_example",)):
            raise ConfigError("strategy.balance", config.balance,
                              f"flops or uniform: model '{kind}' has no pipeline_example() to time stages on")
        divisible: dict[str, int] = {}
        if dims.tp > 1:
            if not contract.supports_tp(model):
                need = ", ".join(contract.missing(model, contract.TP_METHODS))
                raise ConfigError("strategy.tp", dims.tp, f"1: model '{kind}' has no tensor-parallel plan "
                                                          f"(it lacks {need} of the parallel contract)")
            if config.sequence_parallel and not contract.offers_sequence_parallel(model):
                raise ConfigError("strategy.sequence_parallel", config.sequence_parallel,
                                  f"false: model '{kind}' offers no sequence-parallel plan")
            divisible = model.tp_divisible()
        if dims.pp > 1 or divisible:
            units = len(model.pipeline_units()) if dims.pp > 1 else dims.num_stages
            dims.validate_model(units=units, divisible=divisible)
        if batch_size is not None:
            dims.validate_batch(batch_size)

    def validate_layout(self, config: HybridConfig, world_size: int, batch_sizes: dict) -> None:
        dims = config.dims()
        dims.validate_world(world_size)
        for key, size in batch_sizes.items():  # evaluation batches are cut into micro-batches too
            try:
                dims.validate_batch(size)
            except ConfigError as exc:
                raise ConfigError(key, size, exc.allowed) from None

    def validate_plugins(self, config: HybridConfig, plugins: list) -> None:
        from dsframe.plugin import Plugin

        if config.pp > 1:
            # a pipeline schedule computes the loss inside the last stage; a plugin's loss term
            # (which needs the whole model's logits in one place) cannot join it
            with_loss = [p.name for p in plugins if type(p).loss is not Plugin.loss]
            if with_loss:
                raise ConfigError("strategy.pp", config.pp,
                                  f"1 when the stage uses plugins that add a loss term ({', '.join(with_loss)})")

    def build(self, config: HybridConfig, trainer: Any = None):
        from dsframe.parallel.strategy import HybridParallelStrategy
        backend = config.resolved_backend(getattr(trainer, "accelerator", "cpu"))
        return HybridParallelStrategy(dp=config.dp, tp=config.tp, pp=config.pp, micro_batches=config.micro_batches,
                                      schedule=config.schedule, dp_mode=config.dp_mode,
                                      hierarchical_allreduce=config.hierarchical_allreduce,
                                      sequence_parallel=config.sequence_parallel,
                                      dp_overlap=config.dp_overlap, bucket_mb=config.bucket_mb,
                                      ranks_per_node=config.ranks_per_node, balance=config.balance,
                                      start_method=config.start_method, process_group_backend=backend,
                                      timeout=timedelta(seconds=config.timeout_s))
