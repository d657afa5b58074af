"""The process layout of hybrid parallel training: pp × dp × tp, validated before any process starts.

Modelled on torchtitan's ``ParallelDims``: the layout is checked on its own (sizes, world size),
then against the model (the sizes its ``tp_divisible()`` names divisible by tp; pipeline units ≥
stages) and
the batch (micro-batches ≥ pp and dividing the per-rank batch). Every failure is a
:class:`dsframe.errors.ConfigError` naming the key, the bad value and what is allowed.

Rank order. The mesh is laid out ``(pp, dp, tp)`` with tp innermost, so the tp ranks of one
group are consecutive global ranks (the same node when ``tp ≤ gpus per node``: TP's
all-reduces stay on NVLink), dp next, pp outermost::

    global_rank = (pp_rank * dp + dp_rank) * tp + tp_rank
"""
from __future__ import annotations

from dataclasses import dataclass

from dsframe.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
# two virtual stages per rank: looped (rank r holds r and r + pp) or V-shaped (r and 2·pp − 1 − r)
LOOPED = ("interleaved_1f1b", "interleaved_zb")
V_SHAPED = ("zbv", "dualpipev")
MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1
    schedule: str = "1f1b"

    def __post_init__(self):
        for key in ("dp", "tp", "pp", "micro_batches"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"strategy.{key}", v, "an integer ≥ 1")
        if self.schedule not in SCHEDULES:
            raise ConfigError("strategy.schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        if self.pp > 1 and self.micro_batches < self.pp:
            raise ConfigError("strategy.micro_batches", self.micro_batches,
                              f"at least pp={self.pp} micro-batches, or the pipeline never fills")
        if self.schedule in LOOPED and self.pp > 1 and self.micro_batches % self.pp:
            raise ConfigError("strategy.micro_batches", self.micro_batches,
                              f"a multiple of pp={self.pp} for the {self.schedule} schedule")
        if self.schedule == "dualpipev" and self.pp > 1 and self.micro_batches < 2 * self.pp:
            raise ConfigError("strategy.micro_batches", self.micro_batches,
                              f"at least 2·pp={2 * self.pp} for DualPipeV (one per virtual stage)")

    # ------------------------------------------------------------------ sizes
    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.pp, self.dp, self.tp)

    @property
    def stages_per_rank(self) -> int:
        """Virtual pipeline stages held by one pp rank (2 for the interleaved and V schedules)."""
        return 2 if (self.schedule in LOOPED + V_SHAPED and self.pp > 1) else 1

    @property
    def v_shaped(self) -> bool:
        return self.schedule in V_SHAPED

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def coords(self, global_rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank: {'pp': .., 'dp': .., 'tp': ..}."""
        return {"pp": global_rank // (self.dp * self.tp),
                "dp": (global_rank // self.tp) % self.dp,
                "tp": global_rank % self.tp}

    def bubble_fraction(self) -> float:
        """Theoretical idle fraction of a GPipe/1F1B pipeline: (p − 1) / (m + p − 1)."""
        p, m = self.pp, self.micro_batches
        return (p - 1) / (m + p - 1)

    # ------------------------------------------------------------------ checks
    def validate_world(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ConfigError(
                "strategy", f"dp={self.dp} tp={self.tp} pp={self.pp}",
                f"dp·tp·pp must equal the world size {world_size} (trainer.devices × trainer.num_nodes); "
                f"here it is {self.world_size}")

    def validate_model(self, *, units: int, divisible: dict[str, int] | None = None,
                       units_key: str = "model.n_layer") -> None:
        """The model can be split tp ways (``divisible``: config key -> size that tp must divide, the
        model's ``tp_divisible()``) and into pp stages (``units`` pipeline units, one per stage at least)."""
        t = self.tp
        for key, v in (divisible or {}).items():
            if v % t:
                raise ConfigError(key, v, f"a multiple of strategy.tp={t} (tensor parallel splits it "
                                          f"across {t} ranks)")
        if units < self.num_stages:
            what = (f"pp={self.pp} × 2 virtual stages" if self.stages_per_rank == 2
                    else f"strategy.pp={self.pp}")
            raise ConfigError(units_key, units, f"at least {what} layers: each pipeline stage needs a layer")

    def validate_batch(self, batch_size: int) -> None:
        """``batch_size`` is the per-dp-rank batch (the data loader's batch)."""
        if self.pp > 1 and batch_size % self.micro_batches:
            raise ConfigError("data.batch_size", batch_size,
                              f"a multiple of strategy.micro_batches={self.micro_batches} "
                              f"(each pipeline step splits the batch into equal micro-batches)")

    def validate(self, world_size: int, *, batch_size: int | None = None, units: int | None = None,
                 divisible: dict[str, int] | None = None) -> None:
        self.validate_world(world_size)
        if units is not None:
            self.validate_model(units=units, divisible=divisible)
        if batch_size is not None:
            self.validate_batch(batch_size)
