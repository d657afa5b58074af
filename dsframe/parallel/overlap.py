"""Data-parallel gradient all-reduce overlapped with backward, in buckets, as DDP does.

Parameters are grouped into buckets of about ``bucket_bytes`` in reverse registration order (the
order backward produces their gradients). A gradient hook (``register_post_accumulate_grad_hook``)
counts the gradients of a bucket as they become final; when the last one arrives the bucket is
flattened, divided by the dp size and its all-reduce is started asynchronously, while autograd goes
on with the earlier layers. :meth:`finish` (before the optimizer step) waits for the outstanding
all-reduces and copies the averages back.

Only the backward of an optimizer step's last accumulation micro-step starts communication
(:meth:`arm`). The hierarchical all-reduce is three dependent collectives (reduce inside the node,
all-reduce across nodes, broadcast inside the node), which gloo and NCCL cannot chain as one
asynchronous operation: a bucket's chain runs on a helper thread instead, one thread per rank so
that every rank issues the buckets in the same order, while autograd goes on (the collectives
release the GIL while they wait). ``exposed_s`` is the communication time not hidden behind
backward: what :meth:`finish` waited.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class OverlappedGradSync:
    def __init__(self, params: list[nn.Parameter], group, dp: int, bucket_bytes: int,
                 hierarchical: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.group, self.dp, self.hierarchical = group, dp, hierarchical
        self._chains = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsframe-hier-allreduce")
                        if hierarchical is not None else None)
        self.buckets: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in reversed(params):
            n = _local(p).numel() * p.element_size()
            if self.buckets[-1] and size + n > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += n
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self.armed = False
        self.ready: list[int] = []
        self.launched: list[tuple] = []
        self.bytes_sent = 0
        self.calls = 0
        self.exposed_s = 0.0

    def arm(self) -> None:
        """The coming backward is the optimizer step's last: start each bucket once it is complete."""
        self.armed = True
        self.ready = [0] * len(self.buckets)
        self.launched = []

    def _hook(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        b = self.bucket_of[id(p)]
        self.ready[b] += 1
        if self.ready[b] == len(self.buckets[b]):
            self._launch(b)

    def _launch(self, b: int) -> None:
        grads = [_local(p.grad) for p in self.buckets[b] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.dp)
        if self._chains is not None:
            work = self._chains.submit(self._hierarchical, flat)
        else:
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self.bytes_sent += flat.numel() * flat.element_size()
        self.calls += 1
        self.launched.append((b, flat, work, grads))

    def _hierarchical(self, flat: torch.Tensor) -> None:
        if flat.is_cuda:                # the current GPU is per thread: a new one starts on GPU 0
            torch.cuda.set_device(flat.device)
        before = getattr(self.hierarchical, "bytes_sent", 0)
        self.hierarchical(flat)
        self.bytes_sent += getattr(self.hierarchical, "bytes_sent", 0) - before

    def finish(self) -> None:
        """Wait for the bucket all-reduces and write the averaged gradients back. Buckets that never
        completed (a parameter without gradient this step) are reduced now."""
        done = {b for b, *_ in self.launched}
        for b in range(len(self.buckets)):
            if b not in done:
                self._launch(b)
        t0 = time.perf_counter()
        for _, _, work, _ in self.launched:
            if isinstance(work, Future):
                work.result()          # re-raises what the chain raised (a timed-out peer, ...)
            else:
                work.wait()
        self.exposed_s += time.perf_counter() - t0
        for _, flat, _, grads in self.launched:
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n
        self.launched = []
        self.armed = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self._chains is not None:
            self._chains.shutdown(wait=True)
