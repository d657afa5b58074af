"""Hybrid-parallel layouts on CPU/gloo or CUDA/NCCL: parity, pipeline bubble, throughput,
communication, memory, balance.

    python benchmarks/parallel.py --out benchmarks/results/parallel.json   # ~6 min on 2 CPU cores
    python benchmarks/parallel.py --out p.json --layouts tp2,pp2_1f1b_m4 --steps 4
    benchmarks/parallel_gpu.sh            # the same on CUDA GPUs with NCCL (--accelerator cuda)

For each layout the same GPT is trained for ``--steps`` optimizer steps (step 0 is warm-up and
not measured) under HybridParallelStrategy on forked ranks (gloo on CPU, NCCL on CUDA: one GPU per
rank; layouts needing more GPUs than are visible are listed as skipped), and once in one process.
Written per layout:

* ``max_abs_diff`` — largest |weight difference| to the one-process run after training, and
  ``loss_max_abs_diff`` over the per-step losses;
* ``bubble`` — measured idle fraction of the pipeline schedule per rank, 1 − (time inside stage
  forward/backward chunks) / (time of the whole schedule step), next to the theoretical
  (p − 1)/(m + p − 1) of GPipe/1F1B;
* ``comm_bytes_per_step`` — payload bytes this rank handed to collectives per optimizer step,
  split into tp (DTensor functional collectives, counted by a dispatch mode), pp (stage sends),
  dp (gradient all-reduce, or FSDP2's all-gather + reduce-scatter), next to the analytic count
  (``comm_bytes_analytic``) from the shapes;
* ``tokens_per_s`` — global batch tokens / step time (the slowest rank's mean over the measured
  steps), and ``speedup`` over the one-process run (same model, batch and device kind);
* ``param_bytes_rank`` vs ``param_bytes_total`` — what one rank holds of the model;
* ``stage_imbalance`` — max/min stage cost − 1 of the balanced pipeline split;
* ``pipeline_ms_per_step`` (per rank) — the schedule's time split into compute, waiting on p2p and
  issuing p2p (the rest: the schedule's own Python and the final loss broadcast);
* ``bubble_at_stage_times`` (GPipe, 1F1B) — the idle fraction the measured stage compute times
  imply with free communication: between it and the theory is the stages' imbalance, between it
  and the measured bubble what p2p and the schedule cost.

On CUDA the times are the GPU's: a chunk's compute is timed with CUDA events on its stream (so a
wait for a received activation is not counted as compute) and the schedule and step times are
taken after synchronising. A markdown table is written next to the JSON (same name, .md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dsframe.parallel.testing import RunSpec, max_abs_diff, run  # noqa: E402

MODEL = dict(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=192, dropout=0.0)
SEQ, GLOBAL_BATCH = 64, 32

LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2_sequence_parallel": dict(tp=2, sequence_parallel=True),
    "pp2_gpipe_m2": dict(pp=2, micro_batches=2, schedule="gpipe"),
    "pp2_gpipe_m8": dict(pp=2, micro_batches=8, schedule="gpipe"),
    "pp2_1f1b_m4": dict(pp=2, micro_batches=4, schedule="1f1b"),
    "pp2_1f1b_m8": dict(pp=2, micro_batches=8, schedule="1f1b"),
    "pp2_interleaved_m4": dict(pp=2, micro_batches=4, schedule="interleaved_1f1b"),
    "pp2_interleaved_m8": dict(pp=2, micro_batches=8, schedule="interleaved_1f1b"),
    "pp2_interleaved_zb_m8": dict(pp=2, micro_batches=8, schedule="interleaved_zb"),
    "pp2_zbv_m8": dict(pp=2, micro_batches=8, schedule="zbv"),
    "pp2_dualpipev_m8": dict(pp=2, micro_batches=8, schedule="dualpipev"),
    "dp2": dict(dp=2),
    "dp2_fsdp": dict(dp=2, dp_mode="fsdp"),
    "dp2_tp2": dict(dp=2, tp=2),
    "pp2_tp2": dict(pp=2, tp=2, micro_batches=4, schedule="1f1b"),
    "dp4_hierarchical": dict(dp=4, hierarchical_allreduce=True, ranks_per_node=2),
    "dp2_overlap": dict(dp=2, dp_overlap=True, bucket_mb=1.0),
    "dp2_tp2_overlap": dict(dp=2, tp=2, dp_overlap=True, bucket_mb=1.0),
    "dp4_hierarchical_overlap": dict(dp=4, hierarchical_allreduce=True, ranks_per_node=2, dp_overlap=True,
                                     bucket_mb=1.0),
    "dp2_pp2_fsdp": dict(dp=2, pp=2, micro_batches=4, schedule="1f1b", dp_mode="fsdp"),
}


COLLECTIVES = {"all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast"}


class Probe(pl.Callback):
    """Per-rank timings and communication payloads of the measured steps; rank 0 writes them."""

    def __init__(self, out: str, instrument: bool = True):
        self.out = out
        self.instrument = instrument    # False: step times only (the one-process run, in this process)

    # -- instrumentation, installed in each rank's process --------------------------------
    def setup(self, trainer, pl_module, stage):
        import torch.distributed as dist
        from torch.distributed.pipelining import schedules
        from torch.distributed.pipelining.stage import _PipelineStageBase
        from torch.utils._python_dispatch import TorchDispatchMode

        probe = self
        self.c = {"busy": 0.0, "pipe": 0.0, "step": 0.0, "tp": 0, "pp": 0, "fsdp": 0, "steps": 0,
                  "p2p_issue": 0.0, "p2p_wait": 0.0}
        self.active = False
        self.cuda = trainer.strategy.root_device.type == "cuda"
        self.chunk_events = []      # CUDA: (start, end) events of this step's compute chunks
        if not self.instrument:
            return

        def host_timed(fn, key, payload=None):
            """``fn`` with its host time (and ``payload(args)`` bytes into "pp") added while measuring."""
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    if probe.active:
                        probe.c[key] += time.perf_counter() - t0
                        if payload is not None:
                            probe.c["pp"] += payload(a)
            return wrapper

        def timed(fn):
            host = host_timed(fn, "busy")

            def wrapper(*a, **k):
                if not (probe.cuda and probe.active):
                    return host(*a, **k)
                # queued after the stream's wait for received tensors: only the chunk's kernels
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    return fn(*a, **k)
                finally:
                    end.record()
                    probe.chunk_events.append((start, end))
            return wrapper

        # compute: forward, backward (zero-bubble schedules: input-gradient and deferred weight-
        # gradient halves) and the loss on the last stage; everything else in a step is bubble
        _PipelineStageBase.forward_one_chunk = timed(_PipelineStageBase.forward_one_chunk)
        _PipelineStageBase.backward_one_chunk = timed(_PipelineStageBase.backward_one_chunk)
        _PipelineStageBase.backward_weight_one_chunk = timed(_PipelineStageBase.backward_weight_one_chunk)
        schedules._PipelineSchedule._maybe_compute_loss = timed(schedules._PipelineSchedule._maybe_compute_loss)

        def sent_bytes(args):
            return sum(op.tensor.numel() * op.tensor.element_size() for op in args[0] if op.op is dist.isend)

        # where a rank's non-compute time goes (host time): issuing sends/receives, waiting on them
        schedules._batch_p2p = host_timed(schedules._batch_p2p, "p2p_issue", sent_bytes)  # _sorted_batch_p2p too
        schedules._wait_batch_p2p = host_timed(schedules._wait_batch_p2p, "p2p_wait")

        def counted(fn, key):
            def wrapper(*a, **k):
                inp = k["input"] if "input" in k else a[1]
                if probe.active:
                    probe.c[key] += inp.numel() * inp.element_size()
                return fn(*a, **k)
            return wrapper

        # FSDP2's collectives (looked up on torch.distributed at call time)
        for name in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
                     "reduce_scatter_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, counted(getattr(dist, name), "fsdp"))

        class FunctionalCollectives(TorchDispatchMode):
            """DTensor's collectives are functional ops (_c10d_functional.*): count their inputs."""

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ns = getattr(func, "namespace", "")
                if (probe.active and ns.startswith("_c10d_functional")
                        and func.__name__.split(".")[0] in COLLECTIVES):
                    t = args[0]
                    if isinstance(t, torch.Tensor):
                        probe.c["tp"] += t.numel() * t.element_size()
                return func(*args, **(kwargs or {}))

        self.mode = FunctionalCollectives()
        strategy = trainer.strategy
        if getattr(strategy, "sync_gradients", None) is not None:
            sync = strategy.sync_gradients

            def sync_gradients(*a, **k):        # the dp all-reduce when not overlapped: all exposed
                t0 = time.perf_counter()
                try:
                    return sync(*a, **k)
                finally:
                    if probe.active:
                        probe.c["dp_exposed_s"] = probe.c.get("dp_exposed_s", 0.0) + time.perf_counter() - t0
            strategy.sync_gradients = sync_gradients
        if hasattr(strategy, "_run_pipeline"):
            inner = strategy._run_pipeline

            def run_pipeline(*a, **k):
                probe.sync()
                t0 = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    if probe.active:
                        probe.sync()
                        probe.c["pipe"] += time.perf_counter() - t0
            strategy._run_pipeline = run_pipeline

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = batch_idx >= 1           # step 0: warm-up (shape inference, first allocation)
        self.sync()
        self.dp0 = getattr(trainer.strategy, "comm_bytes", 0)
        ov = getattr(trainer.strategy, "_overlap", None)
        self.exposed0 = ov.exposed_s if ov is not None else 0.0
        self.t0 = time.perf_counter()
        # the counting mode is a Python hook on every op: only where there are functional (TP)
        # collectives to count, or it slows the compute it is timing (pp2 1F1B m8: step 0.37 → 0.27 s)
        self.counting = getattr(getattr(trainer.strategy, "dims", None), "tp", 1) > 1
        if self.counting:
            self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.counting:
            self.mode.__exit__(None, None, None)
        self.sync()
        if self.active:
            self.c["step"] += time.perf_counter() - self.t0
            self.c["busy"] += sum(a.elapsed_time(b) for a, b in self.chunk_events) / 1000.0   # ms
            self.chunk_events.clear()
            self.c["steps"] += 1
            self.c["dp"] = self.c.get("dp", 0) + getattr(trainer.strategy, "comm_bytes", 0) - self.dp0
            ov = getattr(trainer.strategy, "_overlap", None)
            if ov is not None:                   # time finish() waited on bucket all-reduces
                self.c["dp_exposed_s"] = self.c.get("dp_exposed_s", 0.0) + ov.exposed_s - self.exposed0
        self.active = False

    def on_train_end(self, trainer, pl_module):
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        s = trainer.strategy
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                    for p in pl_module.parameters())
        n = max(1, self.c["steps"])
        distributed = hasattr(s, "_coord")     # the one-process run is probed too (its step time)
        me = {"rank": s.global_rank, "coords": {d: s._coord(d) for d in ("pp", "dp", "tp")} if distributed else {},
              "param_bytes_rank": local, "step_s": self.c["step"] / n,
              "dp_exposed_s": self.c.get("dp_exposed_s", 0.0) / n,
              "bytes_per_step": {k: self.c.get(k, 0) // n for k in ("tp", "pp", "dp", "fsdp")}}
        if self.c["pipe"] > 0:
            me["bubble"] = 1.0 - self.c["busy"] / self.c["pipe"]
            me["pipe_ms"] = {k: round(1000 * self.c[c] / n, 2) for k, c in (
                ("schedule", "pipe"), ("compute", "busy"), ("p2p_wait", "p2p_wait"), ("p2p_issue", "p2p_issue"))}
        every = [None] * s.world_size
        if distributed:
            dist.all_gather_object(every, me)
        else:
            every = [me]
        if s.global_rank == 0:
            plan = getattr(s, "stage_plan", None)
            extra = {"stage_plan": plan.as_dict()} if plan is not None else {}
            Path(self.out).write_text(json.dumps({"ranks": every, **extra}))


def theory_bubble(schedule: str, p: int, m: int) -> float:
    """Idle fraction of a schedule with equal chunk times: GPipe/1F1B (p − 1)/(m + p − 1); interleaved
    1F1B with 2 virtual stages per rank (p − 1)/(2m + p − 1) (Narayanan et al. 2021); the zero-bubble
    schedules (Qi et al. 2024) 0 when forward, input-gradient and weight-gradient times are equal."""
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if schedule == "interleaved_1f1b":
        return (p - 1) / (2 * m + p - 1)
    return 0.0


def bubble_at_stage_times(schedule: str, ranks: list[dict], m: int) -> float | None:
    """GPipe/1F1B's idle fraction for the stage times a run measured (each stage's compute per
    micro-batch) and free communication: a step takes about (m − 1)·max(t) + Σ t (the slowest stage
    works through every micro-batch, the others fill and drain), stage s idles 1 − m·t_s of it.
    Above theory_bubble: what the stages' imbalance costs; below the measured bubble: what p2p and
    the schedule's own work cost. None for the other schedules."""
    if schedule not in ("gpipe", "1f1b"):
        return None
    per_stage: dict[int, list[float]] = {}
    for r in ranks:
        per_stage.setdefault(r["coords"]["pp"], []).append(r["pipe_ms"]["compute"] / m)
    t = [statistics.mean(v) for _, v in sorted(per_stage.items())]
    step = (m - 1) * max(t) + sum(t)
    return statistics.mean(1.0 - m * ts / step for ts in t)


def analytic_bytes(layout: dict, rank: dict, n_params: int) -> dict:
    """Payload bytes per optimizer step for one rank, from the shapes (fp32)."""
    dp, tp, pp = layout.get("dp", 1), layout.get("tp", 1), layout.get("pp", 1)
    B = GLOBAL_BATCH // dp                       # rows per dp rank per step
    C, V, L = MODEL["n_embd"], MODEL["vocab_size"], MODEL["n_layer"]
    act = B * SEQ * C * 4
    out = {"tp": 0, "pp": 0, "dp": 0, "fsdp": 0}
    c = rank["coords"]
    last = c["pp"] == pp - 1
    blocks = L // pp                              # the benchmark's splits are even (4 blocks)
    if tp > 1 and layout.get("sequence_parallel"):
        # per block, forward: all-gather (input: the local sequence shard) before attn and mlp,
        # reduce-scatter (input: the whole activation) after their row-wise output; backward mirrors it.
        # Head: all-gather before it, all-gather of the logits, reduce-scatter of its input gradient.
        # The embeddings' output is sliced into the first block (free) and its gradient all-gathered.
        # The LayerNorms' Partial gradients are all-reduced once per step.
        out["tp"] = (blocks * 4 * (act // tp + act) + act // tp + B * SEQ * V // tp * 4 + act
                     + act // tp + (2 * L + 1) * 2 * C * 4)
    elif tp > 1:
        # forward: one all-reduce per row-wise layer (attn.proj, mlp.proj); backward: one all-reduce of
        # the input gradient per column-wise layer (q, k, v, fc); LM head: all-gather of the vocab shards
        # of the logits (forward) and all-reduce of its input gradient (backward)
        out["tp"] = blocks * (2 + 4) * act + (B * SEQ * V // tp * 4 + act if last else 0)
    if pp > 1:
        # each stage sends its activations forward (unless last) and its input gradient back (unless
        # first); interleaved: a rank holds stages r and r + pp of 2·pp
        from dsframe.parallel.layout import ParallelDims
        from dsframe.parallel.pipeline import stage_ids

        d = ParallelDims(pp=pp, micro_batches=layout.get("micro_batches", 1),
                         schedule=layout.get("schedule", "1f1b"))
        rank_of = {i: r for r in range(pp) for i in stage_ids(r, pp, d.stages_per_rank, d.v_shaped)}
        n = d.num_stages   # a send crosses ranks only if the neighbour stage is elsewhere (V: 1 -> 2 is local)
        out["pp"] = sum((act if i < n - 1 and rank_of[i + 1] != c["pp"] else 0)
                        + (act if i > 0 and rank_of[i - 1] != c["pp"] else 0)
                        for i, r in rank_of.items() if r == c["pp"])
    grad_bytes = rank["param_bytes_rank"]
    if dp > 1 and layout.get("dp_mode") == "fsdp":
        out["fsdp"] = grad_bytes + grad_bytes * dp     # all-gather own shard, reduce-scatter the whole
    elif dp > 1:
        if layout.get("hierarchical_allreduce"):
            per = layout.get("ranks_per_node") or dp
            leader = c["dp"] % per == 0
            out["dp"] = grad_bytes * ((2 if per > 1 else 0) + (1 if leader and dp // per > 1 else 0))
        else:
            out["dp"] = grad_bytes
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="runs per pipeline layout (bubble: median)")
    ap.add_argument("--adamw-steps", type=int, default=20,
                    help="AdamW parity section: steps per layout (0: skip)")
    ap.add_argument("--n-embd", type=int, default=MODEL["n_embd"],
                    help="model width: the compute per micro-batch against the schedule's fixed costs")
    ap.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: gloo ranks, one thread each; cuda: NCCL ranks, one GPU each")
    args = ap.parse_args(argv)
    MODEL["n_embd"] = args.n_embd
    torch.set_num_threads(1)
    names = [n for n in args.layouts.split(",") if n]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    from dsframe.machine import gpu_count, machine_info

    gpus = gpu_count() if args.accelerator == "cuda" else 0
    if args.accelerator == "cuda" and gpus == 0:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        ap.error(f"--accelerator cuda: no CUDA device is visible (torch {torch.__version__}, {build}); "
                 "run it on a machine with GPUs, or use --accelerator cpu")
    if args.accelerator == "cuda":
        # parity is compared in true fp32: TF32 matmuls would differ from one process by ~1e-3
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    names, skipped = fitting_layouts(names, gpus if args.accelerator == "cuda" else None)
    for name, why in skipped.items():
        print(f"{name:18s} skipped: {why}", flush=True)
    base = dict(steps=args.steps, global_batch=GLOBAL_BATCH, seq_len=SEQ, model={"kind": "gpt", **MODEL},
                vocab=MODEL["vocab_size"], lr=0.1, accelerator=args.accelerator)

    results = {"model": MODEL, "seq_len": SEQ, "global_batch": GLOBAL_BATCH, "steps": args.steps,
               "measured_steps": args.steps - 1, "torch": torch.__version__, "accelerator": args.accelerator,
               "backend": "nccl" if args.accelerator == "cuda" else "gloo",
               "machine": machine_info(), "layouts": {}, "skipped": skipped}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ref = run(RunSpec(**base), f"{tmp}/ref.pt", callbacks=[Probe(f"{tmp}/ref.probe.json", instrument=False)])
        ref_time = time.perf_counter() - t0
        ref_step = json.loads(Path(f"{tmp}/ref.probe.json").read_text())["ranks"][0]["step_s"]
        n_params = sum(v.numel() for v in ref["params"].values())
        results["param_bytes_total"] = n_params * 4
        results["one_process_wall_s"] = round(ref_time, 2)
        results["one_process_step_s"] = round(ref_step, 4)
        results["one_process_tokens_per_s"] = round(GLOBAL_BATCH * SEQ / ref_step, 1)
        for name in names:
            lay = LAYOUTS[name]
            probe_file = f"{tmp}/{name}.probe.json"
            t0 = time.perf_counter()
            res = run(RunSpec(layout=lay, **base), f"{tmp}/{name}.pt", callbacks=[Probe(probe_file)])
            wall = time.perf_counter() - t0
            probe = json.loads(Path(probe_file).read_text())
            p, m = lay.get("pp", 1), lay.get("micro_batches", 1)
            step = max(r["step_s"] for r in probe["ranks"])   # the step ends when the slowest rank's does
            row = {"layout": lay, "world_size": len(probe["ranks"]), "wall_s": round(wall, 2),
                   "step_s": round(step, 4), "tokens_per_s": round(GLOBAL_BATCH * SEQ / step, 1),
                   "speedup": round(ref_step / step, 3),
                   "max_abs_diff": max_abs_diff(res["params"], ref["params"]),
                   "loss_max_abs_diff": max(abs(a - b) for a, b in zip(res["losses"], ref["losses"])),
                   "param_bytes_total": n_params * 4, "ranks": []}
            for r in probe["ranks"]:
                rr = {"rank": r["rank"], "coords": r["coords"], "step_s": round(r["step_s"], 4),
                      "param_bytes_rank": r["param_bytes_rank"],
                      "param_fraction": round(r["param_bytes_rank"] / (n_params * 4), 4),
                      "comm_bytes_per_step": r["bytes_per_step"],
                      "comm_bytes_analytic": analytic_bytes(lay, r, n_params)}
                if "bubble" in r:
                    rr["bubble_measured"] = round(r["bubble"], 4)
                    rr["pipeline_ms_per_step"] = r["pipe_ms"]   # first run: schedule, compute, p2p wait/issue
                row["ranks"].append(rr)
            if p > 1:
                row["bubble_theoretical"] = round(theory_bubble(lay.get("schedule", "1f1b"), p, m), 4)
                bubbles = [sum(r["bubble"] for r in probe["ranks"]) / len(probe["ranks"])]
                at_stage_times = [bubble_at_stage_times(lay.get("schedule", "1f1b"), probe["ranks"], m)]
                for k in range(1, args.repeats):   # the bubble is a timing: median of repeated runs
                    run(RunSpec(layout=lay, **base), f"{tmp}/{name}.pt", callbacks=[Probe(probe_file)])
                    again = json.loads(Path(probe_file).read_text())["ranks"]
                    bubbles.append(sum(r["bubble"] for r in again) / len(again))
                    at_stage_times.append(bubble_at_stage_times(lay.get("schedule", "1f1b"), again, m))
                row["bubble_measured_runs"] = [round(b, 4) for b in bubbles]
                row["bubble_measured_mean"] = round(statistics.median(bubbles), 4)
                if at_stage_times[0] is not None:
                    row["bubble_at_stage_times"] = round(statistics.median(at_stage_times), 4)
                row["stage_imbalance"] = round(probe["stage_plan"]["imbalance"], 4)
                row["stages"] = probe["stage_plan"]["stages"]
            if lay.get("dp", 1) > 1 and lay.get("dp_mode", "allreduce") == "allreduce":
                row["dp_exposed_s_per_step"] = round(statistics.mean(r["dp_exposed_s"] for r in probe["ranks"]), 5)
                base_name = name.removesuffix("_overlap")
                if lay.get("dp_overlap") and base_name in results["layouts"]:
                    # hidden = 1 − (wait left after backward) / (the same all-reduce run after backward)
                    plain = results["layouts"][base_name]["dp_exposed_s_per_step"]
                    row["dp_comm_hidden_fraction"] = round(1.0 - row["dp_exposed_s_per_step"] / plain, 3)
            results["layouts"][name] = row
            print(f"{name:18s} diff {row['max_abs_diff']:.2e}  "
                  + (f"bubble {row['bubble_measured_mean']:.3f} (theory {row['bubble_theoretical']:.3f})  "
                     if p > 1 else "") + f"wall {wall:.1f}s", flush=True)
        if args.adamw_steps:
            results["adamw_parity"] = adamw_parity(base, args.adamw_steps, tmp,
                                                   gpus if args.accelerator == "cuda" else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results["machine"]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")


ADAMW_LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2, micro_batches=2), "dp2_tp2": dict(dp=2, tp=2),
                 "pp2_tp2": dict(pp=2, tp=2, micro_batches=2),
                 "pp2_interleaved": dict(pp=2, micro_batches=4, schedule="interleaved_1f1b")}


def world_size(layout: dict) -> int:
    return layout.get("dp", 1) * layout.get("tp", 1) * layout.get("pp", 1)


def fitting_layouts(names: list[str], gpus: int | None, layouts: dict | None = None) -> tuple[list[str], dict]:
    """The layouts that can run (``gpus`` None: CPU ranks, any number) and, for the others, why not:
    NCCL takes one GPU per rank (two ranks cannot share a GPU)."""
    layouts = LAYOUTS if layouts is None else layouts
    if gpus is None:
        return list(names), {}
    fit = [n for n in names if world_size(layouts[n]) <= gpus]
    return fit, {n: f"needs {world_size(layouts[n])} GPUs (one per rank), {gpus} visible"
                 for n in names if n not in fit}


def adamw_parity(base: dict, steps: int, tmp: str, gpus: int | None = None) -> dict:
    """The task's AdamW (weight decay 0.01 on matrices, LR decaying linearly by samples) for ``steps``
    steps per layout vs one process: loss curves, and weights split into attention key biases (exact
    gradient 0: Adam turns round-off into up-to-lr steps) and all others."""
    spec = {**base, "steps": steps, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01}
    ref = run(RunSpec(**spec), f"{tmp}/adamw_ref.pt")
    rows = {"steps": steps, "lr": 1e-3, "loss_first_last_one_process": [ref["losses"][0], ref["losses"][-1]],
            "layouts": {}}
    names, skipped = fitting_layouts(list(ADAMW_LAYOUTS), gpus, ADAMW_LAYOUTS)
    rows["skipped"] = skipped
    for name in names:
        lay = ADAMW_LAYOUTS[name]
        res = run(RunSpec(layout=lay, **spec), f"{tmp}/adamw_{name}.pt")
        live = [k for k in ref["params"] if not k.endswith("attn.k.bias")]
        null = [k for k in ref["params"] if k.endswith("attn.k.bias")]
        rows["layouts"][name] = {
            "loss_max_abs_diff": max(abs(a - b) for a, b in zip(res["losses"], ref["losses"])),
            "weights_max_abs_diff": max_abs_diff({k: res["params"][k] for k in live}, {k: ref["params"][k] for k in live}),
            "key_bias_max_abs_diff": max_abs_diff({k: res["params"][k] for k in null}, {k: ref["params"][k] for k in null})}
        print(f"adamw {name:16s} {rows['layouts'][name]}", flush=True)
    return rows


def markdown(results: dict) -> str:
    m = results.get("machine", {})
    gpu = f", {m['gpus']} × {m.get('gpu', 'GPU')}" if m.get("gpus") else ""
    ref = results.get("one_process_tokens_per_s")
    lines = [f"Machine: {m.get('cpu_model', '?')} ({m.get('arch', '?')}, {m.get('cpus', '?')} CPUs; "
             f"{' '.join(m.get('cpu_flags', []))}{gpu}), torch {m.get('torch', '?')}, "
             f"{results.get('accelerator', 'cpu')}/{results.get('backend', 'gloo')}, load average "
             f"{m.get('load_avg_1m', '?')} before / {m.get('load_avg_1m_after', '?')} after."
             + (f" One process: {ref:,.0f} tokens/s." if ref else ""), "",
             "| layout | ranks | max_abs_diff | bubble measured median (min–max) / at measured stage times / theory | imbalance | "
             "comm bytes/step rank 0 (measured / analytic) | params on rank 0 | tokens/s (× one process) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["layouts"].items():
        r0 = r["ranks"][0]
        meas = sum(r0["comm_bytes_per_step"].values())
        ana = sum(r0["comm_bytes_analytic"].values())
        runs = r.get("bubble_measured_runs", [])
        at = f"{r['bubble_at_stage_times']:.3f}" if "bubble_at_stage_times" in r else "–"
        bub = (f"{r['bubble_measured_mean']:.3f} ({min(runs):.3f}–{max(runs):.3f}) / {at} / {r['bubble_theoretical']:.3f}"
               if "bubble_theoretical" in r else "–")
        imb = f"{r['stage_imbalance']:.3f}" if "stage_imbalance" in r else "–"
        tps = f"{r['tokens_per_s']:,.0f} ({r['speedup']:.2f})" if "tokens_per_s" in r else "–"
        lines.append(f"| {name} | {r['world_size']} | {r['max_abs_diff']:.1e} | {bub} | {imb} | "
                     f"{meas:,} / {ana:,} | {100 * r0['param_fraction']:.0f} % | {tps} |")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"| {name} | – | skipped: {why} | | | | | |")
    hidden = {n: r for n, r in results["layouts"].items() if "dp_comm_hidden_fraction" in r}
    if hidden:
        lines += ["", "| overlapped dp layout | dp all-reduce wait per step, overlapped / after backward | "
                  "communication hidden |", "|---|---|---|"]
        for name, r in hidden.items():
            plain = results["layouts"][name.removesuffix("_overlap")]["dp_exposed_s_per_step"]
            lines.append(f"| {name} | {1000 * r['dp_exposed_s_per_step']:.1f} ms / {1000 * plain:.1f} ms | "
                         f"{100 * r['dp_comm_hidden_fraction']:.0f} % |")
    ad = results.get("adamw_parity")
    if ad:
        lines += ["", f"AdamW parity, {ad['steps']} steps, lr {ad['lr']} (one-process loss "
                  f"{ad['loss_first_last_one_process'][0]:.3f} → {ad['loss_first_last_one_process'][1]:.3f}):", "",
                  "| layout | loss max abs diff | weights max abs diff (all but key biases) | key biases |",
                  "|---|---|---|---|"]
        for name, r in ad["layouts"].items():
            lines.append(f"| {name} | {r['loss_max_abs_diff']:.1e} | {r['weights_max_abs_diff']:.1e} | "
                         f"{r['key_bias_max_abs_diff']:.1e} |")
        for name, why in ad.get("skipped", {}).items():
            lines.append(f"| {name} | skipped: {why} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
