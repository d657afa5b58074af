"""Recommend a dp × tp × pp layout and micro-batches for a decoder LM on a GPU cluster.

    python -m dsframe.plan params=30e9 gpus=256 gpu_mem_gb=80
    python -m dsframe.plan params=175e9 gpus=1024 gpu_mem_gb=80 --json

Every layout with dp·tp·pp = gpus is scored with a memory model and a time model; the
fastest one that fits in memory wins, and the output says why (memory per GPU, bubble,
communication per step against compute).

Memory per GPU (bytes), mixed-precision Adam without optimizer sharding (Megatron's layout):
  states       = 20 · P / (tp · pp)         bf16 weight 2 + fp32 main grad 4 + fp32 master, m, v 12
                                            + bf16 grad 2
  activations  = L · 34·s·b·h / tp          (Korthikanti et al. 2022 with sequence parallel and
                                            flash attention, i.e. no s² score matrix; under 1F1B the
                                            first stage holds pp micro-batches of L/pp layers = L
                                            layers' worth)
  fits when states + activations ≤ 0.9 · gpu_mem (the rest: buffers, fragmentation).

Time per step (seconds):
  compute  = 6 · P · tokens / (gpus · peak · mfu) · (1 + bubble),  bubble = (p−1)/(m+p−1)
  tp comm  = 4 all-reduces of s·b·h·2 bytes per layer per micro-batch (fwd 2, bwd 2),
             ring cost 2(t−1)/t · bytes / bw, bw = intra-node if tp ≤ gpus_per_node else inter-node
  pp comm  = 2 · (m + p − 1) p2p sends of s·b·h·2 bytes per stage boundary
  dp comm  = all-reduce of 2·P/(tp·pp) bytes over dp ranks (inter-node), half hidden behind backward

Choice among the layouts that fit: see :func:`rank_key` (tp inside a node, then the smallest tp·pp,
tp before pp, then time; pipeline stages split the layers evenly). Given Megatron-LM's shapes,
batches and GPU counts it picks the tp and pp of all seven rows of Narayanan et al. 2021, Table 1
(tests/test_plan.py).

The model's shape, when not given, follows GPT-3's aspect ratio h ≈ 128·L (P ≈ 12·L·h²), L a
multiple of 8 (16 past 64 layers), hidden a multiple of 1024, heads of size 128.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, fields

from dsframe.errors import ConfigError

GB = 1e9


@dataclass
class Cluster:
    gpus: int
    gpu_mem_gb: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 312.0      # A100 bf16 dense
    mfu: float = 0.5                # achieved fraction of peak in matmuls
    intra_node_gbps: float = 300.0  # NVLink, GB/s per GPU, one direction
    inter_node_gbps: float = 25.0   # 200 Gb/s InfiniBand per GPU


@dataclass
class Workload:
    params: float
    seq_len: int = 2048
    global_batch: int = 1024        # sequences per optimizer step
    micro_batch_size: int = 1       # sequences per micro-batch
    layers: int = 0                 # 0: derived from params
    hidden: int = 0                 # 0: derived from params
    heads: int = 0                  # 0: hidden / 128

    def shape(self) -> tuple[int, int, int]:
        L, h = self.layers, self.hidden
        if not L and not h:   # depth ≈ (P / 12·128²)^(1/3), rounded as real models are (×8, ×16 past 64)
            L = (self.params / (12 * 128 ** 2)) ** (1 / 3)
            step = 8 if L < 64 else 16
            L = max(step, round(L / step) * step)
        if not h:
            h = max(1024, round(math.sqrt(self.params / (12 * L)) / 1024) * 1024)
        if not L:
            L = max(1, round(self.params / (12 * h * h)))
        a = self.heads or max(1, h // 128)
        return L, h, a


@dataclass
class Layout:
    dp: int
    tp: int
    pp: int
    micro_batches: int
    mem_states_gb: float = 0.0
    mem_activations_gb: float = 0.0
    bubble: float = 0.0
    t_compute: float = 0.0
    t_tp: float = 0.0
    t_pp: float = 0.0
    t_dp: float = 0.0
    fits: bool = False
    why_not: str = ""

    @property
    def mem_gb(self) -> float:
        return self.mem_states_gb + self.mem_activations_gb

    @property
    def step_time(self) -> float:
        return self.t_compute + self.t_tp + self.t_pp + self.t_dp

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mem_gb=round(self.mem_gb, 2), step_time_s=round(self.step_time, 3))
        return d


def _ring(bytes_: float, n: int, gbps: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * bytes_ / (gbps * GB)


def evaluate(c: Cluster, w: Workload, dp: int, tp: int, pp: int) -> Layout:
    L, h, a = w.shape()
    s, b = w.seq_len, w.micro_batch_size
    m = w.global_batch // (dp * b) if w.global_batch % (dp * b) == 0 else 0
    lay = Layout(dp, tp, pp, m)
    if m == 0:
        lay.why_not = f"global_batch {w.global_batch} not divisible by dp·micro_batch_size {dp * b}"
        return lay
    if pp > 1 and m < pp:
        lay.why_not = f"{m} micro-batches < {pp} stages"
        return lay
    if L % pp:
        lay.why_not = f"{L} layers do not split evenly into {pp} stages"
        return lay
    if h % tp or a % tp:
        lay.why_not = f"hidden {h} / heads {a} not divisible by tp={tp}"
        return lay
    lay.mem_states_gb = 20 * w.params / (tp * pp) / GB
    lay.mem_activations_gb = L * 34 * s * b * h / tp / GB
    lay.fits = lay.mem_gb <= 0.9 * c.gpu_mem_gb
    if not lay.fits:
        lay.why_not = f"needs {lay.mem_gb:.1f} GB > 90% of {c.gpu_mem_gb:g} GB"
    lay.bubble = (pp - 1) / (m + pp - 1)
    tokens = w.global_batch * s
    lay.t_compute = 6 * w.params * tokens / (c.gpus * c.peak_tflops * 1e12 * c.mfu) * (1 + lay.bubble)
    act = s * b * h * 2
    tp_bw = c.intra_node_gbps if tp <= c.gpus_per_node else c.inter_node_gbps
    lay.t_tp = 4 * (L / pp) * m * _ring(act, tp, tp_bw)
    pp_bw = c.intra_node_gbps if tp * dp * pp <= c.gpus_per_node else c.inter_node_gbps
    lay.t_pp = 0.0 if pp == 1 else 2 * (m + pp - 1) * act / tp / (pp_bw * GB)
    dp_bw = c.intra_node_gbps if tp * dp <= c.gpus_per_node else c.inter_node_gbps
    lay.t_dp = 0.5 * _ring(2 * w.params / (tp * pp), dp, dp_bw)
    return lay


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(c: Cluster, w: Workload) -> list[Layout]:
    out = []
    for tp in _divisors(c.gpus):
        if tp & (tp - 1):   # powers of two only: heads and hidden are
            continue
        for pp in _divisors(c.gpus // tp):
            out.append(evaluate(c, w, c.gpus // (tp * pp), tp, pp))
    return out


def rank_key(c: Cluster, x: Layout) -> tuple:
    """Order of preference among layouts that fit (Narayanan et al. 2021, takeaways 1 and 2):

    1. tensor parallel stays inside a node (its 4 all-reduces per layer per micro-batch need NVLink);
       across nodes only when nothing else fits;
    2. the smallest model-parallel size tp·pp that fits — the rest goes to dp, whose only cost is one
       gradient all-reduce per step, hidden behind backward, with no bubble and no per-layer traffic;
    3. within that, tp before pipeline stages — tp divides the activations every stage stashes,
       while each extra stage adds bubble and stash;
    4. then the modelled step time.
    """
    return (x.tp > c.gpus_per_node, x.tp * x.pp, -x.tp, x.step_time)


def recommend(c: Cluster, w: Workload) -> tuple[Layout, list[Layout]]:
    if c.gpus < 1:
        raise ConfigError("gpus", c.gpus, "an integer ≥ 1")
    if w.params <= 0:
        raise ConfigError("params", w.params, "a positive parameter count, e.g. 30e9")
    cands = candidates(c, w)
    ok = sorted((x for x in cands if x.fits), key=lambda x: rank_key(c, x))
    if not ok:
        best = min(cands, key=lambda x: x.mem_gb if x.mem_gb else float("inf"))
        raise ConfigError("gpus", c.gpus, f"more GPUs or memory: no layout of {c.gpus} × "
                                          f"{c.gpu_mem_gb:g} GB fits {w.params:.3g} params "
                                          f"(least memory: dp={best.dp} tp={best.tp} pp={best.pp}, "
                                          f"{best.why_not})")
    return ok[0], ok


def explain(c: Cluster, w: Workload, best: Layout, ranked: list[Layout]) -> str:
    L, h, a = w.shape()
    lines = [
        f"model: {w.params / 1e9:.3g}B params ≈ {L} layers × hidden {h} × {a} heads, seq {w.seq_len}",
        f"cluster: {c.gpus} GPUs × {c.gpu_mem_gb:g} GB, {c.gpus_per_node} per node; "
        f"global batch {w.global_batch} × micro-batch {w.micro_batch_size}",
        "",
        f"recommended: dp={best.dp} tp={best.tp} pp={best.pp} micro_batches={best.micro_batches}",
        f"  memory/GPU  {best.mem_gb:6.1f} GB  (states {best.mem_states_gb:.1f} + activations "
        f"{best.mem_activations_gb:.1f}; limit {0.9 * c.gpu_mem_gb:.0f})",
        f"  step time   {best.step_time:6.2f} s   (compute {best.t_compute:.2f} incl. bubble "
        f"{100 * best.bubble:.1f}%, tp {best.t_tp:.2f}, pp {best.t_pp:.2f}, dp {best.t_dp:.2f})",
        "why (tp inside a node, the smallest tp·pp that fits, tp before pp, then the modelled step",
        "     time — Narayanan et al. 2021):",
    ]
    if best.tp <= c.gpus_per_node:
        lines.append(f"  tp={best.tp} keeps tensor-parallel all-reduces (4 per layer per micro-batch) "
                     f"inside a node")
    no_fit = [x for x in candidates(c, w) if not x.fits and x.tp == best.tp and x.pp < best.pp]
    if no_fit:
        x = max(no_fit, key=lambda x: x.pp)
        lines.append(f"  pp={best.pp}: with pp={x.pp} the model does not fit ({x.why_not})")
    elif best.pp > 1:
        lines.append(f"  pp={best.pp} splits layers and state across stages; bubble "
                     f"(p−1)/(m+p−1) = {100 * best.bubble:.1f}% with {best.micro_batches} micro-batches")
    lines.append(f"  dp={best.dp} takes the remaining GPUs; its gradient all-reduce moves "
                 f"{2 * w.params / (best.tp * best.pp) / GB:.2f} GB per step")
    lines.append("runners-up (the time model alone would rank them close: it omits the smaller GEMMs' and "
                 "extra stages' overheads):")
    for x in ranked[1:4]:
        lines.append(f"  dp={x.dp:<4} tp={x.tp:<3} pp={x.pp:<3} {x.step_time:6.2f} s  {x.mem_gb:5.1f} GB  "
                     f"bubble {100 * x.bubble:.1f}%")
    return "\n".join(lines)


def _parse(argv: list[str]) -> tuple[Cluster, Workload, bool]:
    as_json = "--json" in argv
    kv = {}
    for arg in argv:
        if arg == "--json":
            continue
        if "=" not in arg:
            raise ConfigError(arg, arg, "key=value arguments, e.g. params=30e9 gpus=256 gpu_mem_gb=80")
        k, v = arg.split("=", 1)
        kv[k.strip()] = v.strip()
    known = {f.name: (Cluster, f.type) for f in fields(Cluster)}
    known.update({f.name: (Workload, f.type) for f in fields(Workload)})
    for req in ("params", "gpus"):
        if req not in kv:
            raise ConfigError(req, None, "required: python -m dsframe.plan params=30e9 gpus=256 gpu_mem_gb=80")
    c_args, w_args = {}, {}
    for k, v in kv.items():
        if k not in known:
            raise ConfigError(k, v, f"one of {', '.join(sorted(known))}")
        cls, typ = known[k]
        try:
            val = float(v) if typ in ("float", float) else int(float(v))
        except ValueError:
            raise ConfigError(k, v, "a number") from None
        if val <= 0 and k not in ("layers", "hidden", "heads"):
            raise ConfigError(k, v, "a positive number")
        (c_args if cls is Cluster else w_args)[k] = val
    return Cluster(**c_args), Workload(**w_args), as_json


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    try:
        c, w, as_json = _parse(argv)
        best, ranked = recommend(c, w)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"recommended": best.as_dict(), "ranked": [x.as_dict() for x in ranked[:10]],
                          "cluster": asdict(c), "workload": asdict(w)}, indent=2))
    else:
        print(explain(c, w, best, ranked))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
