"""The process layout of hybrid parallel training: pp × dp × tp, validated before any process starts.

Modelled on torchtitan's ``ParallelDims``: the layout is checked on its own (sizes, world size),
then against the model (heads, hidden and vocab divisible by tp; layers ≥ pipeline stages) and
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

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
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
        if self.schedule == "interleaved_1f1b" and self.pp > 1 and self.micro_batches % self.pp:
            raise ConfigError("strategy.micro_batches", self.micro_batches,
                              f"a multiple of pp={self.pp} for the interleaved 1F1B schedule")

    # ------------------------------------------------------------------ sizes
    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.pp, self.dp, self.tp)

    @property
    def stages_per_rank(self) -> int:
        """Virtual pipeline stages held by one pp rank (2 for interleaved 1F1B)."""
        return 2 if (self.schedule == "interleaved_1f1b" and self.pp > 1) else 1

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
                f"dp·tp·pp must equal the world size {world_size} (devices × num_nodes); "
                f"here it is {self.world_size}")

    def validate_model(self, *, n_layer: int, n_head: int | None = None, n_embd: int | None = None,
                       vocab_size: int | None = None, ffn: int | None = None) -> None:
        """The model can be split tp ways (heads, hidden, vocab) and into pp stages (layers)."""
        t = self.tp
        for key, v in (("n_head", n_head), ("n_embd", n_embd), ("vocab_size", vocab_size), ("ffn", ffn)):
            if v is not None and v % t:
                raise ConfigError(f"model.{key}", v, f"a multiple of strategy.tp={t} (tensor parallel "
                                                     f"splits it across {t} ranks)")
        if n_layer < self.num_stages:
            what = (f"pp={self.pp} × 2 virtual stages" if self.stages_per_rank == 2
                    else f"strategy.pp={self.pp}")
            raise ConfigError("model.n_layer", n_layer, f"at least {what} layers: each pipeline stage "
                                                         f"needs a layer")

    def validate_batch(self, batch_size: int) -> None:
        """``batch_size`` is the per-dp-rank batch (the data loader's batch)."""
        if self.pp > 1 and batch_size % self.micro_batches:
            raise ConfigError("data.batch_size", batch_size,
                              f"a multiple of strategy.micro_batches={self.micro_batches} "
                              f"(each pipeline step splits the batch into equal micro-batches)")

    def validate(self, world_size: int, *, batch_size: int | None = None, **model_dims) -> None:
        self.validate_world(world_size)
        if model_dims:
            self.validate_model(**model_dims)
        if batch_size is not None:
            self.validate_batch(batch_size)


def model_dims(model) -> dict:
    """The dims `validate_model` needs, read from a dsframe model's ``arch()`` (GPT or BERT)."""
    arch = model.arch() if hasattr(model, "arch") else dict(model)
    cfg = arch.get("config", arch)
    get = lambda *names: next((cfg[n] for n in names if n in cfg and cfg[n] is not None), None)  # noqa: E731
    dims = {"n_layer": get("n_layer", "num_hidden_layers", "layers"),
            "n_head": get("n_head", "num_attention_heads", "heads"),
            "n_embd": get("n_embd", "hidden_size", "hidden"),
            "vocab_size": get("vocab_size", "vocab"),
            "ffn": get("ffn", "intermediate_size")}
    return {k: v for k, v in dims.items() if v is not None}
