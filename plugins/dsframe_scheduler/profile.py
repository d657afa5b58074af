"""Profile real training steps of the current model on this machine into a trace folder in the
AdaptDL/Pollux layout, so the simulator reads it like any trace (``--traces DIR``):

- ``placements.csv`` (``placement,local_bsz,step_time,sync_time,precision``): median seconds per
  step at each local batch size, precision and worker count (1 or more forked gloo ranks on this
  machine; ``placement`` = workers on the one node). ``sync_time`` is the DDP step minus the same
  step without the gradient all-reduce (``no_sync``).
- ``validation-<B>.csv`` (``progress,iteration,metric,grad_sqr,grad_var``): a short training run
  at total batch B: progress in steps of the smallest profiled batch B0 (samples / B0), the
  validation accuracy, and the gradient statistics |G|² and tr(Σ)/B0 (so that
  B_noise = B0 · grad_var / grad_sqr) from ``GradientNoiseScale``.

Run it as a stage (registered as ``scheduler_profile``)::

    python -m dsframe recipe=scheduler_profile                 # the debug-size BERT, ~2 min
    python -m dsframe recipe=scheduler_profile model=minilm    # the real model: slower

or ``python -m dsframe_scheduler.profile OUT_DIR [dsframe overrides ...]``.
"""
from __future__ import annotations

import copy
import csv
import logging
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsframe.batch import call_model
from dsframe.io import atomic_write, write_json
from dsframe_scheduler.config import ProfileOptions

log = logging.getLogger("dsframe.scheduler")


def _autocast(precision: str):
    if precision == "32-true":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)


def _batches(dataset, collate, batch: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    while len(order) < batch * count:
        order += order
    return [collate([dataset[i] for i in order[k * batch:(k + 1) * batch]]) for k in range(count)]


def _step(model, opt, batch, precision, ddp=None, sync=True):
    with _autocast(precision):
        logits = call_model(ddp or model, batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
    if ddp is not None and not sync:
        with ddp.no_sync():
            loss.backward()
    else:
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(model, batches, precision, steps, ddp=None, sync=True) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # the step's cost, not learning, is measured
    _step(model, opt, batches[0], precision, ddp, sync)  # warm-up
    times = []
    for b in batches[1:steps + 1]:
        start = time.perf_counter()
        _step(model, opt, b, precision, ddp, sync)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank(rank, world, init, model, batches, precisions, steps, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        ddp = DistributedDataParallel(model)
        rows = {}
        for precision in precisions:
            for bsz, bs in batches.items():
                full = time_steps(model, bs, precision, steps, ddp, sync=True)
                local = time_steps(model, bs, precision, steps, ddp, sync=False)
                rows[(bsz, precision)] = (full, max(0.0, full - local))
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def profile_steps(model, dataset, collate, opts: ProfileOptions, workdir: Path) -> list[dict]:
    import torch.multiprocessing as mp

    rows = []
    for workers in opts.workers:
        batches = {b: _batches(dataset, collate, b, opts.steps + 1) for b in opts.batch_sizes}
        if workers == 1:
            for precision in opts.precisions:
                for bsz in opts.batch_sizes:
                    t = time_steps(copy.deepcopy(model), batches[bsz], precision, opts.steps)
                    rows.append({"placement": "1", "local_bsz": bsz, "step_time": t, "sync_time": 0.0,
                                 "precision": precision})
                    log.info("profile: 1 worker, %s, batch %d: %.4f s/step", precision, bsz, t)
            continue
        out, init = workdir / f"w{workers}.pt", workdir / f"init-{workers}-{time.time_ns()}"
        mp.start_processes(_rank, args=(workers, str(init), copy.deepcopy(model), batches, opts.precisions,
                                        opts.steps, str(out)), nprocs=workers, start_method="fork")
        for (bsz, precision), (t, sync) in sorted(torch.load(out, weights_only=False).items()):
            rows.append({"placement": str(workers), "local_bsz": bsz, "step_time": t, "sync_time": sync,
                         "precision": precision})
            log.info("profile: %d workers, %s, batch %d: %.4f s/step (sync %.4f)", workers, precision, bsz, t, sync)
    return rows


def validation_run(model, train, val, collate, batch: int, b0: int, opts: ProfileOptions, lr: float) -> list[dict]:
    """Train a copy at batch ``batch``; every ``validation_every`` samples record accuracy and the
    gradient statistics, Pollux-style."""
    from dsframe_scheduler.signals import GradientNoiseScale

    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    noise = GradientNoiseScale(beta=0.2)
    val_batches = _batches(val, collate, 64, opts.val_batches, seed=1)
    steps = max(1, opts.validation_samples // batch)
    every = max(1, opts.validation_every // batch)
    rows = []
    for it, b in enumerate(_batches(train, collate, batch, steps, seed=2), start=1):
        loss = F.cross_entropy(call_model(model, b), b["labels"])
        loss.backward()
        noise.update([p.grad for p in model.parameters() if p.grad is not None], batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % every == 0 or it == steps:
            model.eval()
            with torch.no_grad():
                correct = sum(int((call_model(model, v).argmax(-1) == v["labels"]).sum()) for v in val_batches)
                total = sum(len(v["labels"]) for v in val_batches)
            model.train()
            sqr, var = noise.statistics()
            rows.append({"progress": it * batch / b0, "iteration": it, "metric": correct / total,
                         "grad_sqr": sqr, "grad_var": var * batch / b0})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    def _w(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, _w)


def profile(ctx: Any) -> dict:
    """Stage function ``scheduler_profile``: writes ``<stage_dir>/trace/``."""
    from dsframe import registry
    from dsframe.machine import machine_info

    opts = ctx.options(ProfileOptions)
    spec = ctx.cfg
    model = registry.models.get(spec.model.kind, key="model.kind").build(_model_config(spec))
    dm = ctx.datamodule
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    collate = train.collate_fn
    out = ctx.stage_dir / "trace"
    out.mkdir(parents=True, exist_ok=True)
    rows = profile_steps(model, train.dataset, collate, opts, ctx.stage_dir)
    _write_csv(out / "placements.csv", rows)
    b0 = min(opts.validation_batches)
    for batch in opts.validation_batches:
        vrows = validation_run(model, train.dataset, val.dataset, collate, batch, b0, opts,
                               float(spec.optim.lr))
        _write_csv(out / f"validation-{batch}.csv", vrows)
    write_json(out / "profile.json", {"machine": machine_info(), "options": vars(opts),
                                      "model": spec.model.kind})
    return {"settings": len(rows), "trace": str(out)}


def _model_config(cfg):
    from dsframe import registry
    from dsframe.config.schema import component_config

    return component_config(registry.models, cfg.model, "model")


def main(argv: list[str]) -> int:
    """``python -m dsframe_scheduler.profile OUT_DIR [overrides ...]``: the stage, outside a recipe."""
    if not argv:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    from hydra import compose, initialize_config_module

    import dsframe.cli  # noqa: F401  (resolvers)
    from dsframe import registry
    from dsframe.config import validate
    from dsframe.plugin import StageContext

    with initialize_config_module("dsframe.conf", version_base="1.3"):
        cfg = compose("config", overrides=["recipe=scheduler_profile", *argv[1:]])
    spec = validate(cfg)
    dm = registry.data.get(spec.data.kind, key="data.kind")(spec.data)
    ctx = StageContext(run_dir=Path(argv[0]), stage_name="profile", cfg=cfg,
                       stage=spec.recipe.stages["profile"], datamodule=dm)
    print(profile(ctx))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))

# each stage function declares its options; dsframe checks them when it validates the config
profile.Config = ProfileOptions
