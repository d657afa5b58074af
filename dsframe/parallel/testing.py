"""Parity harness: the same training under a parallel layout and in one process.

The model is any registered dsframe model (``RunSpec.model["kind"]``, looked up in the
``dsframe.models`` registry: GPT by default, the BERT classifier with ``task="classification"``).

Used by tests/test_parallel_*.py and benchmarks/parallel.py. Both runs see the same global
batches in the same order: the data module gives dp rank r rows ``[r·b, (r+1)·b)`` of each global
batch of ``dp·b`` rows (Lightning's DistributedSampler is switched off, since it would shuffle),
so the mean loss over dp ranks equals the one-process loss over the global batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


class _Rows(Dataset):
    def __init__(self, x, y, mask=None):
        self.x, self.y, self.mask = x, y, mask

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        row = {"input_ids": self.x[i], "labels": self.y[i]}
        if self.mask is not None:
            row["attention_mask"] = self.mask[i]
        return row


def token_data(n_rows: int, seq_len: int, vocab: int, seed: int = 0):
    """Random token sequences with targets = next token (a learnable pattern: y = (x·3 + 1) mod V)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n_rows, seq_len), generator=g)
    return x, (x * 3 + 1) % vocab


def class_data(n_rows: int, seq_len: int, vocab: int, num_labels: int, seed: int = 0):
    """Random token sequences, right-padded to random lengths (attention mask), with a label that
    depends on the tokens (sum of the first 3 tokens mod num_labels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n_rows, seq_len), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n_rows,), generator=g)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    x = x * mask
    return x, x[:, :3].sum(1) % num_labels, mask


class ShardedLMData(pl.LightningDataModule):
    """Global batches of ``global_batch`` rows; a dp rank gets its contiguous slice of each."""

    def __init__(self, x, y, global_batch: int, mask=None):
        super().__init__()
        self.x, self.y, self.global_batch, self.mask = x, y, global_batch, mask

    def train_dataloader(self):
        strategy = self.trainer.strategy
        kw = getattr(strategy, "distributed_sampler_kwargs", None) or {"num_replicas": 1, "rank": 0}
        n, r = kw["num_replicas"], kw["rank"]
        b = self.global_batch // n
        rows = [k * self.global_batch + r * b + i for k in range(len(self.x) // self.global_batch)
                for i in range(b)]
        mask = self.mask[rows] if self.mask is not None else None
        return DataLoader(_Rows(self.x[rows], self.y[rows], mask), batch_size=b, shuffle=False)


class Recorder(pl.Callback):
    """Mean loss over ranks after every step; the whole model's weights at the end (rank 0 saves)."""

    def __init__(self, out: str):
        self.out = out
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean")))

    def on_train_end(self, trainer, pl_module):
        s = trainer.strategy
        params = s.full_state_dict() if hasattr(s, "full_state_dict") else {
            k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        extra = {}
        if hasattr(s, "stage_plan") and s.stage_plan is not None:
            extra["stage_plan"] = s.stage_plan.as_dict()
        if hasattr(s, "comm_bytes"):
            extra["dp_comm_bytes"] = s.comm_bytes
        if trainer.global_rank == 0:
            torch.save({"losses": self.losses, "params": params, **extra}, self.out)


@dataclass
class RunSpec:
    layout: Optional[dict] = None     # HybridParallelStrategy kwargs; None = one process
    steps: int = 3
    global_batch: int = 8
    accumulate: int = 1
    seq_len: int = 16
    model: dict = field(default_factory=lambda: dict(kind="gpt", vocab_size=64, block_size=16, n_layer=4,
                                                     n_head=4, n_embd=32, dropout=0.0))
    task: str = "lm"                  # lm (next-token data) | classification (padded sequences, labels)
    vocab: int = 64                   # token ids of the generated data are < vocab
    lr: float = 0.1
    optimizer: str = "sgd"            # sgd (momentum 0.9) or adamw (the task's own)
    weight_decay: float = 0.0         # AdamW's (the task's parameter groups)
    seed: int = 0
    n_batches: int = 0                # global batches in the data set; 0: steps × accumulate
    timeout_s: int = 60
    ckpt_dir: Optional[str] = None    # save a DCP checkpoint here after training
    resume_from: Optional[str] = None
    clip: Optional[float] = None      # gradient_clip_val
    precision: str = "32-true"
    accelerator: str = "cpu"          # cpu (gloo) | cuda (nccl, one GPU per rank; since forked ranks
                                      # the parent must not initialise CUDA before forking: the
                                      # one-process reference then runs in a forked child too)


def build_model(spec: RunSpec):
    from dsframe import registry

    cfg = dict(spec.model)
    cls = registry.models.get(cfg.get("kind", "gpt"))
    return cls.build(cls.Config(**cfg))


def build_task(spec: RunSpec):
    from dsframe.task import TASKS, OptimConfig

    torch.manual_seed(spec.seed)
    model = build_model(spec)
    base = TASKS[spec.task]
    cls = _sgd_task_class(base) if spec.optimizer == "sgd" else base
    kw = {"num_classes": model.classifier.out_features} if spec.task == "classification" else {}
    return cls(model, optim=OptimConfig(lr=spec.lr, weight_decay=spec.weight_decay, warmup_ratio=0.0), **kw)


def _sgd_task_class(base):
    class SGDTask(base):
        """The task with SGD + momentum: parity runs compare gradients, and Adam's per-element
        normalisation would blow float round-off in gradients that are zero in exact arithmetic
        (e.g. attention key biases: softmax ignores a shift of all scores) up to lr-sized steps."""

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=self.optim.lr, momentum=0.9)

    return SGDTask


def run(spec: RunSpec, out: str, callbacks: list | None = None, fork_reference: bool | None = None) -> dict:
    """Train ``spec`` (forked ranks when ``spec.layout`` is given); returns what rank 0 recorded.
    ``fork_reference``: run a one-process spec in a forked child (default: on CUDA, where a parent
    that has initialised CUDA could not fork the ranks of the next layout)."""
    if fork_reference is None:
        fork_reference = spec.accelerator != "cpu"
    if fork_reference and not spec.layout:
        import multiprocessing

        child = multiprocessing.get_context("fork").Process(target=_fit, args=(spec, out, callbacks))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"the one-process {spec.accelerator} run failed (exit code {child.exitcode})")
        result = torch.load(out, weights_only=True, map_location="cpu")
        result["parent_params"] = result["params"]
        return result
    return _fit(spec, out, callbacks)


def _fit(spec: RunSpec, out: str, callbacks: list | None) -> dict:
    from dsframe.parallel.strategy import HybridParallelStrategy

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    task = build_task(spec)
    n_rows = spec.global_batch * (spec.n_batches or spec.steps * spec.accumulate)
    if spec.task == "classification":
        x, y, mask = class_data(n_rows, spec.seq_len, spec.vocab, task.model.classifier.out_features,
                                seed=spec.seed + 1)
    else:
        (x, y), mask = token_data(n_rows, spec.seq_len, spec.vocab, seed=spec.seed + 1), None
    data = ShardedLMData(x, y, spec.global_batch, mask)
    if spec.layout:
        lay = dict(spec.layout)
        world = lay.get("dp", 1) * lay.get("tp", 1) * lay.get("pp", 1)
        strategy = HybridParallelStrategy(timeout=timedelta(seconds=spec.timeout_s), **lay)
        devices = world
    else:
        strategy, devices = "auto", 1
    # the task's LR schedule runs on samples over total_samples, which it reads from the loader's
    # batch size when training starts; this harness's plain DataLoader is not loaded yet then (it
    # would read batch 1), so fix the total here, counted as the task counts (samples of every replica)
    task.total_samples = spec.steps * spec.accumulate * spec.global_batch
    callbacks = [*(callbacks or []), Recorder(out)] + ([_SaveAtEnd(spec.ckpt_dir)] if spec.ckpt_dir else [])
    trainer = pl.Trainer(accelerator=spec.accelerator, devices=devices, strategy=strategy, max_steps=spec.steps,
                         accumulate_grad_batches=spec.accumulate, use_distributed_sampler=False,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         gradient_clip_val=spec.clip, precision=spec.precision, callbacks=callbacks,
                         default_root_dir=os.path.dirname(out))
    trainer.fit(task, datamodule=data, ckpt_path=spec.resume_from)
    if trainer.global_rank != 0:   # launched by torchrun/SLURM: every rank runs this; rank 0 reports
        return {}
    result = torch.load(out, weights_only=True, map_location="cpu")
    # what the launching process holds after fit (the forked ranks hand the whole model back)
    result["parent_params"] = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    return result


class _SaveAtEnd(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


def max_abs_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise AssertionError(f"different parameters: {sorted(set(a) ^ set(b))[:5]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
