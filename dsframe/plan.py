"""Recommend a dp × tp × pp layout and micro-batches for a decoder LM on a GPU cluster, and predict
its step time, per-GPU throughput and scaling efficiency.

    python -m dsframe.plan params=30e9 gpus=256 gpu_mem_gb=80
    python -m dsframe.plan params=175e9 gpus=1024 gpu_mem_gb=80 --json

Every layout with dp·tp·pp = gpus is scored with a memory model and a time model; the
fastest one that fits in memory wins, and the output says why (memory per GPU, bubble,
communication per step against compute).

Memory per GPU (bytes), mixed-precision Adam without optimizer sharding (Megatron's layout):
  states       = 20 · P / (tp · pp)         bf16 weight 2 + fp32 main grad 4 + fp32 master, m, v 12
                                            + bf16 grad 2
  activations  = L · a_layer,               a_layer = s·b·h·34/tp (Korthikanti et al. 2022, Table 2, with
                                            sequence parallel and flash attention, i.e. no s² score matrix;
                                            without sequence parallel s·b·h·(10 + 24/tp), without flash
                                            attention + 5·a·s²·b/tp); under 1F1B the first stage holds pp
                                            micro-batches of L/pp layers = L layers' worth. With full
                                            recomputation only each layer's input is kept (2·s·b·h, /tp with
                                            sequence parallel) plus one layer's a_layer while it is rebuilt.
  fits when states + activations ≤ 0.9 · gpu_mem (the rest: buffers, fragmentation).

Time per step (seconds), all constants in :class:`Cluster` with their sources. Per micro-batch on one
GPU of a stage (L/pp layers):
  compute  = per layer  passes · 24·b·s·h²·(1 + s/(6h)) / tp / (peak · matmul_eff)      matmuls
                      + passes · b·s·(22h/sp + 16h/tp + 13·a·s/tp) / hbm_bw          elementwise kernels
             + 6·b·s·h·V / tp / pp / (peak · matmul_eff)                             logits, spread over stages
             passes = 3 (forward, backward = 2 forwards) or 4 with recomputation; sp = tp with sequence
             parallel, else 1; the 13·a·s term only without flash attention. The byte counts are
             the HBM traffic of layernorm, bias-dropout-add, bias-GeLU and (without flash attention) the
             score softmax/dropout, counted from the kernels, not fitted (ELEMWISE_*, SCORE_BYTES below).
  tp comm  = per layer 4 all-reduces of b·s·h·2 bytes (6 with recomputation), ring over the tp group
  pp comm  = 2·v sends of b·s·h·2 bytes (v virtual stages of the interleaved schedule); across nodes each
             tp rank sends 1/tp over its own HCA and the stage all-gathers over NVLink
  collective = α + 2(n−1)/n · bytes / bus_bw, α = NCCL base latency + per-hop latency (NVLink or IB)
  step     = (m + (pp−1)/v) · micro-batch time           1F1B: m micro-batches plus the bubble
           + (1 − dp_hidden) · dp all-reduce of 2·P/(tp·pp) bytes + the Adam step (40 B/param over HBM)
  bubble   = (pp−1)/(v·m + pp−1), the idle share of the schedule.

Throughput is counted the way Narayanan et al. 2021 count it (SC'21, "Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM"): FLOPs per iteration with full activation
recomputation F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) (B global batch, s sequence, l layers, h hidden,
V vocabulary); without recomputation the same count with 3 passes instead of 4,
72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)). Per-GPU TFLOP/s = F / (gpus · step time).

Scaling efficiency: per-GPU throughput of the layout divided by that of ONE model-parallel group —
the same tp and pp on tp·pp GPUs, dp = 1, same micro-batch size —
  weak    the group runs one replica's share of the batch (global_batch/dp sequences, the same m
          micro-batches): only the dp all-reduce differs, so this is ≥ 1 − its exposed share;
  strong  the group runs the whole global batch (dp·m micro-batches): fewer micro-batches per replica
          also means a larger bubble, so this falls with more stages or fewer micro-batches.

Checked against the 10 rows of Narayanan et al. 2021, Table 1 (1.7B–1T on 32–3072 A100s), with
matmul_eff calibrated on the 1.7B row only: python benchmarks/plan_vs_megatron.py
--out benchmarks/results/plan_vs_megatron.json: mean absolute error 2.4 % on the other nine rows, worst
76B (+4.1 %). The elementwise byte counts matter most: ×1.5 or ×0.67 of them (matmul_eff re-solved) gives
13.5 % or 7.3 %, leaving them out 18.5 %.

Choice among the layouts that fit: see :func:`rank_key` (tp inside a node, then the smallest tp·pp,
tp before pp, then time; pipeline stages split the layers evenly). Given Megatron-LM's shapes,
batches and GPU counts it picks the tp and pp of the seven rows of Narayanan et al. 2021, Table 1
from 18B up (tp = 8; tests/test_plan.py).

The model's shape, when not given, follows GPT-3's aspect ratio h ≈ 128·L (P ≈ 12·L·h²), L a
multiple of 8 (16 past 64 layers), hidden a multiple of 1024, heads of size 128.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, fields, replace

from dsframe.errors import ConfigError

GB = 1e9

# HBM bytes the elementwise (memory-bound) kernels move per token per layer in one forward pass, fp16/bf16,
# counted from the kernels Megatron-LM runs — not fitted to any throughput:
ELEMWISE_REPLICATED_BYTES = 22  # × h: 2 layernorms (read + write h: 4h) and 2 bias-dropout-residual adds (read 2h,
                                # write h, 1-byte mask: 7h); every tp rank repeats them unless sequence parallel
ELEMWISE_SHARDED_BYTES = 16     # × h/tp: bias-GeLU reads and writes the 4h-wide MLP activation
SCORE_BYTES = 13                # × a·s/tp, without flash attention: per attention score QKᵀ writes 2, softmax reads
                                # 2 writes 2, dropout reads 2 writes 2 + 1 mask, the context matmul reads 2
OPTIMIZER_BYTES_PER_PARAM = 40  # Adam step over HBM: fp16 grad → fp32 (2 + 4 + 4), read + write master, m, v (24),
                                # write the fp16 weight (2), zero the grad (2), inf check (2)
GRAD_BYTES = 2                  # dp all-reduce in the half-precision grad dtype (Megatron 2021; fp32 grads: 4)


@dataclass
class Cluster:
    """Hardware and software constants of the time model. Defaults: A100 80 GB SXM nodes as in Narayanan
    et al. 2021 (Selene: 8 GPUs per node on NVSwitch, one 200 Gb/s HDR InfiniBand HCA per GPU)."""
    gpus: int
    gpu_mem_gb: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 312.0      # A100 fp16/bf16 dense tensor-core peak (NVIDIA A100 datasheet)
    matmul_eff: float = 0.66        # achieved fraction of peak in matmuls: calibrated on ONE published run,
                                    # Megatron's 1.7B row (tp = pp = 1: no tp/pp traffic, no bubble);
                                    # benchmarks/plan_vs_megatron.py
    hbm_gbps: float = 2039.0        # A100 80 GB SXM HBM2e bandwidth (datasheet): bounds the elementwise kernels
    intra_node_gbps: float = 235.0  # NVLink ring bus bandwidth: NCCL's own A100 cap (src/graph/tuning.cc, 2020–21;
                                    # nccl-tests#149 measured ~200 on 8 × A100 80 GB); NVLink3 line rate is 300
    inter_node_gbps: float = 25.0   # per GPU: one HDR 200 Gb/s HCA each (line rate; nccl-tests#119 measured 85–96 %)
    nccl_base_us: float = 8.4       # latency per collective, NCCL ring / Simple protocol (src/graph/tuning.cc)
    nvlink_hop_us: float = 3.4      # latency per ring step over NVLink, same source
    ib_hop_us: float = 9.6          # latency per ring step between nodes, same source
    dp_hidden: float = 0.5          # share of the dp all-reduce hidden behind backward (assumption: bucketed overlap;
                                    # Megatron 2021's local DDP all-reduces after backward: 0)


@dataclass
class Workload:
    params: float
    seq_len: int = 2048
    global_batch: int = 1024        # sequences per optimizer step
    micro_batch_size: int = 1       # sequences per micro-batch
    layers: int = 0                 # 0: derived from params
    hidden: int = 0                 # 0: derived from params
    heads: int = 0                  # 0: hidden / 128
    vocab: int = 51200              # GPT-2 BPE padded, as in Narayanan et al. 2021
    recompute: bool = False         # full activation recomputation (one more forward per backward)
    sequence_parallel: bool = True  # layernorm/dropout split over tp ranks (Korthikanti et al. 2022)
    flash_attention: bool = True    # no s × s score matrix in memory
    virtual_stages: int = 1         # model chunks per pipeline rank (interleaved 1F1B); 1: plain 1F1B

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


def iteration_flops(w: Workload) -> float:
    """FLOPs of one optimizer step, counted as Narayanan et al. 2021 count them. Per layer and token a
    forward pass does 24h² (QKV 6h², projection 2h², MLP 16h²) + 4sh (scores and context); with full
    recomputation it runs 4 times (forward, recomputed forward, backward = 2), the logits' 2hV 3 times:
    96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)). Without recomputation 3 passes:
    72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))."""
    L, h, _ = w.shape()
    B, s = w.global_batch, w.seq_len
    return L * _layer_flops(w, B * s, h) + 6 * B * s * h * w.vocab


def _passes(w: Workload) -> int:
    """Forward, backward (= 2 forwards), and a recomputed forward with full recomputation."""
    return 4 if w.recompute else 3


def _layer_flops(w: Workload, tokens: int, h: int) -> float:
    """One transformer layer over ``tokens`` tokens, every pass of a step (iteration_flops's count)."""
    return _passes(w) * 24 * tokens * h * h * (1 + w.seq_len / (6 * h))


@dataclass
class Layout:
    dp: int
    tp: int
    pp: int
    micro_batches: int
    mem_states_gb: float = 0.0
    mem_activations_gb: float = 0.0
    bubble: float = 0.0             # idle share of the pipeline schedule
    t_compute: float = 0.0          # seconds per step: matmuls + elementwise kernels of the m micro-batches
    t_bubble: float = 0.0           # pipeline fill and drain
    t_tp: float = 0.0
    t_pp: float = 0.0
    t_dp: float = 0.0               # exposed part of the gradient all-reduce
    t_opt: float = 0.0              # optimizer step
    tflops_per_gpu: float = 0.0     # iteration_flops / (gpus · step time)
    tokens_per_s_per_gpu: float = 0.0
    scaling_efficiency_weak: float = 0.0    # vs one tp·pp group running global_batch/dp sequences
    scaling_efficiency_strong: float = 0.0  # vs one tp·pp group running the whole global batch
    fits: bool = False
    why_not: str = ""

    @property
    def mem_gb(self) -> float:
        return self.mem_states_gb + self.mem_activations_gb

    @property
    def step_time(self) -> float:
        return self.t_compute + self.t_bubble + self.t_tp + self.t_pp + self.t_dp + self.t_opt

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mem_gb=round(self.mem_gb, 2), step_time_s=round(self.step_time, 3))
        return d


def _group_bw(c: Cluster, size: int, stride: int) -> tuple[float, int]:
    """Bus bandwidth (bytes/s) and node count of a group of `size` ranks `stride` apart (Megatron's rank order:
    tp innermost, then dp, then pp). Across nodes each member drives its own HCA and NCCL runs one ring per
    NIC, so k members per node get k HCAs' bandwidth, capped by NVLink."""
    per_node = max(1, min(size, c.gpus_per_node // stride))
    nodes = math.ceil(size / per_node)
    if nodes == 1:
        return c.intra_node_gbps * GB, 1
    return min(c.intra_node_gbps, per_node * c.inter_node_gbps) * GB, nodes


def _all_reduce(c: Cluster, bytes_: float, size: int, stride: int) -> float:
    """Ring all-reduce: 2(n−1) steps, each paying a hop latency; 2(n−1)/n of the bytes cross the bus."""
    if size <= 1:
        return 0.0
    bw, nodes = _group_bw(c, size, stride)
    steps, inter = 2 * (size - 1), 2 * (nodes - 1)
    latency_us = c.nccl_base_us + (steps - inter) * c.nvlink_hop_us + inter * c.ib_hop_us
    return latency_us * 1e-6 + steps / size * bytes_ / bw


def _stage_send(c: Cluster, bytes_: float, tp: int, dp: int) -> float:
    """One activation (or gradient) handed to the next stage, tp·dp ranks away: another node once
    tp·dp ≥ gpus_per_node. Then each tp rank sends 1/tp over its own HCA and the receiving stage all-gathers
    over NVLink (Narayanan et al. 2021's scatter/gather; with sequence parallel the tensor is already split)."""
    if tp * dp < c.gpus_per_node:
        return (c.nccl_base_us + c.nvlink_hop_us) * 1e-6 + bytes_ / (c.intra_node_gbps * GB)
    t = (c.nccl_base_us + c.ib_hop_us) * 1e-6 + bytes_ / tp / (c.inter_node_gbps * GB)
    if tp > 1:
        t += (c.nccl_base_us + (tp - 1) * c.nvlink_hop_us) * 1e-6 + (tp - 1) / tp * bytes_ / (c.intra_node_gbps * GB)
    return t


def _evaluate(c: Cluster, w: Workload, dp: int, tp: int, pp: int) -> Layout:
    L, h, a = w.shape()
    s, b = w.seq_len, w.micro_batch_size
    v = w.virtual_stages if pp > 1 else 1
    m = w.global_batch // (dp * b) if w.global_batch % (dp * b) == 0 else 0
    lay = Layout(dp, tp, pp, m)
    if m == 0:
        lay.why_not = f"global_batch {w.global_batch} not divisible by dp·micro_batch_size {dp * b}"
        return lay
    if pp > 1 and m < pp:
        lay.why_not = f"{m} micro-batches < {pp} stages"
        return lay
    if L % (pp * v):
        lay.why_not = f"{L} layers do not split evenly into {pp} stages" + (f" × {v} chunks" if v > 1 else "")
        return lay
    if h % tp or a % tp:
        lay.why_not = f"hidden {h} / heads {a} not divisible by tp={tp}"
        return lay

    lay.mem_states_gb = 20 * w.params / (tp * pp) / GB
    sp = tp if w.sequence_parallel else 1   # what the replicated (layernorm, dropout) part is divided by
    per_layer = s * b * h * (10 / sp + 24 / tp + (0 if w.flash_attention else 5 * a * s / (h * tp)))
    if w.recompute:
        lay.mem_activations_gb = (L * 2 * s * b * h / sp + per_layer) / GB
    else:
        lay.mem_activations_gb = L * per_layer / GB
    lay.fits = lay.mem_gb <= 0.9 * c.gpu_mem_gb
    if not lay.fits:
        lay.why_not = f"needs {lay.mem_gb:.1f} GB > 90% of {c.gpu_mem_gb:g} GB"

    # one micro-batch on one GPU of a stage
    passes = _passes(w)
    matmul = c.peak_tflops * 1e12 * c.matmul_eff
    flops = _layer_flops(w, b * s, h) / tp
    hbm = passes * b * s * (ELEMWISE_REPLICATED_BYTES * h / sp + ELEMWISE_SHARDED_BYTES * h / tp
                            + (0 if w.flash_attention else SCORE_BYTES * a * s / tp))
    logits = 6 * b * s * h * w.vocab / tp   # on the last stage only; spread evenly here (≤ 2 % of a stage)
    mb_compute = L / pp * (flops / matmul + hbm / (c.hbm_gbps * GB)) + logits / pp / matmul
    act = 2 * s * b * h
    mb_tp = L / pp * (6 if w.recompute else 4) * _all_reduce(c, act, tp, 1)
    mb_pp = 0.0 if pp == 1 else 2 * v * _stage_send(c, act, tp, dp)
    mb = mb_compute + mb_tp + mb_pp

    lay.t_compute, lay.t_tp, lay.t_pp = m * mb_compute, m * mb_tp, m * mb_pp
    lay.t_bubble = (pp - 1) / v * mb        # 1F1B: (m + (p−1)/v) micro-batch slots per step
    lay.bubble = lay.t_bubble / (m * mb + lay.t_bubble)
    lay.t_dp = (1 - c.dp_hidden) * _all_reduce(c, GRAD_BYTES * w.params / (tp * pp), dp, tp)
    lay.t_opt = OPTIMIZER_BYTES_PER_PARAM * w.params / (tp * pp) / (c.hbm_gbps * GB)
    gpus = dp * tp * pp
    lay.tflops_per_gpu = iteration_flops(w) / (gpus * lay.step_time) / 1e12
    lay.tokens_per_s_per_gpu = w.global_batch * s / (gpus * lay.step_time)
    return lay


def evaluate(c: Cluster, w: Workload, dp: int, tp: int, pp: int) -> Layout:
    """Memory, time, throughput and scaling efficiency of one layout (see the module docstring)."""
    lay = _evaluate(c, w, dp, tp, pp)
    if not lay.tflops_per_gpu:      # not a valid layout: nothing timed
        return lay
    if dp == 1:
        lay.scaling_efficiency_weak = lay.scaling_efficiency_strong = 1.0
        return lay
    group = replace(c, gpus=tp * pp)
    weak = _evaluate(group, replace(w, global_batch=w.global_batch // dp), 1, tp, pp)
    strong = _evaluate(group, w, 1, tp, pp)
    lay.scaling_efficiency_weak = lay.tflops_per_gpu / weak.tflops_per_gpu
    lay.scaling_efficiency_strong = lay.tflops_per_gpu / strong.tflops_per_gpu
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
        f"  step time   {best.step_time:6.2f} s   (compute {best.t_compute:.2f}, bubble {best.t_bubble:.2f} "
        f"= {100 * best.bubble:.1f}%, tp {best.t_tp:.2f}, pp {best.t_pp:.2f}, dp {best.t_dp:.2f}, "
        f"optimizer {best.t_opt:.2f})",
        f"  throughput  {best.tflops_per_gpu:6.1f} TFLOP/s per GPU ({100 * best.tflops_per_gpu / c.peak_tflops:.0f}% "
        f"of peak, FLOPs counted as Narayanan et al. 2021), {best.tokens_per_s_per_gpu:.0f} tokens/s per GPU",
        f"  scaling     {100 * best.scaling_efficiency_weak:5.1f}% weak (vs one tp·pp group of {best.tp * best.pp} "
        f"GPUs running {w.global_batch // best.dp} sequences),",
        f"              {100 * best.scaling_efficiency_strong:5.1f}% strong (vs that group running all "
        f"{w.global_batch}: more micro-batches, smaller bubble)",
        "why (tp inside a node, the smallest tp·pp that fits, tp before pp, then the modelled step",
        "     time — Narayanan et al. 2021):",
    ]
    if best.tp <= c.gpus_per_node:
        lines.append(f"  tp={best.tp} keeps tensor-parallel all-reduces ({6 if w.recompute else 4} per layer per "
                     f"micro-batch) inside a node")
    no_fit = [x for x in candidates(c, w) if not x.fits and x.tp == best.tp and x.pp < best.pp]
    if no_fit:
        x = max(no_fit, key=lambda x: x.pp)
        lines.append(f"  pp={best.pp}: with pp={x.pp} the model does not fit ({x.why_not})")
    elif best.pp > 1:
        lines.append(f"  pp={best.pp} splits layers and state across stages; bubble "
                     f"(p−1)/(m+p−1) = {100 * best.bubble:.1f}% with {best.micro_batches} micro-batches")
    lines.append(f"  dp={best.dp} takes the remaining GPUs; its gradient all-reduce moves "
                 f"{GRAD_BYTES * w.params / (best.tp * best.pp) / GB:.2f} GB per step")
    lines.append("runners-up (ordered by the rule above, not by the time model, which has one matmul efficiency "
                 "for every GEMM size and no per-stage overheads):")
    for x in ranked[1:4]:
        lines.append(f"  dp={x.dp:<4} tp={x.tp:<3} pp={x.pp:<3} {x.step_time:6.2f} s  {x.tflops_per_gpu:5.1f} TFLOP/s  "
                     f"{x.mem_gb:5.1f} GB  bubble {100 * x.bubble:.1f}%")
    return "\n".join(lines)


ZERO_OK = {"layers", "hidden", "heads", "dp_hidden", "nccl_base_us", "nvlink_hop_us", "ib_hop_us"}


def _value(k: str, v: str, typ) -> float | int | bool:
    if typ in ("bool", bool):
        if v.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(k, v, "true or false")
        return v.lower() in ("true", "1")
    try:
        val = float(v) if typ in ("float", float) else int(float(v))
    except ValueError:
        raise ConfigError(k, v, "a number") from None
    if val < 0 or (val == 0 and k not in ZERO_OK):
        raise ConfigError(k, v, "a number ≥ 0" if k in ZERO_OK else "a positive number")
    if k in ("matmul_eff", "dp_hidden") and val > 1:
        raise ConfigError(k, v, "a fraction ≤ 1")
    return val


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
        (c_args if cls is Cluster else w_args)[k] = _value(k, v, typ)
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
