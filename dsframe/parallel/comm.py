"""Hierarchical all-reduce: reduce inside a node → all-reduce across node leaders → broadcast inside.

Across nodes only one rank per node sends (the leader, with the node's sum), so the slow
inter-node links carry 1/ranks_per_node of the flat all-reduce's traffic; inside the node the
reduce and broadcast run on the fast links. The result equals a flat all-reduce (sum).

Two ways to use it:

* :class:`HierarchicalAllReduce` on a flat tensor — what HybridParallelStrategy does once per step
  for each dp group (``hierarchical_allreduce: true``);
* :func:`ddp_comm_hook` — a ``DistributedDataParallel.register_comm_hook`` hook for plain DDP
  (averaging, like DDP's default all-reduce hook)::

      ddp.register_comm_hook(HierarchicalAllReduce.for_world(ranks_per_node=8), ddp_comm_hook)
"""
from typing import Callable, Sequence

import torch
import torch.distributed as dist


def partition_by_node(groups: Sequence[Sequence[int]], node_of: Callable[[int], int]):
    """For each group of global ranks: {node: its members there} (ordered) and the node leaders."""
    out = []
    for members in groups:
        nodes: dict[int, list[int]] = {}
        for r in members:
            nodes.setdefault(node_of(r), []).append(r)
        out.append((dict(sorted(nodes.items())), [rs[0] for _, rs in sorted(nodes.items())]))
    return out


class HierarchicalAllReduce:
    """Sum-all-reduce of a tensor over one group of ranks, in three steps along the node boundary.

    ``groups`` lists *every* group that some rank will reduce over (e.g. all dp groups of a mesh):
    ``new_group`` is collective over the world, so every rank creates every sub-group, in the same
    order. This rank's own group is the one that contains it.
    """

    def __init__(self, groups: Sequence[Sequence[int]], ranks_per_node: int):
        rank = dist.get_rank()
        self.bytes_sent = 0
        self.calls = 0
        mine = None
        for nodes, leaders in partition_by_node(groups, lambda r: r // max(1, ranks_per_node)):
            intra = {n: dist.new_group(rs) for n, rs in nodes.items()}
            inter = dist.new_group(leaders)
            for n, rs in nodes.items():
                if rank in rs:
                    mine = (intra[n], rs[0], inter, rank in leaders, len(rs), len(leaders))
        if mine is None:
            raise ValueError(f"rank {rank} is in none of the groups {list(map(list, groups))}")
        self.intra, self.leader, self.inter, self.is_leader, self.n_local, self.n_nodes = mine

    @classmethod
    def for_world(cls, ranks_per_node: int) -> "HierarchicalAllReduce":
        return cls([list(range(dist.get_world_size()))], ranks_per_node)

    @property
    def size(self) -> int:
        return self.n_local * self.n_nodes

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum ``flat`` over the group, in place; returns it."""
        nbytes = flat.numel() * flat.element_size()
        if self.n_local > 1:
            dist.reduce(flat, dst=self.leader, group=self.intra)        # 1. sum inside the node
            self.bytes_sent += nbytes
        if self.is_leader and self.n_nodes > 1:
            dist.all_reduce(flat, group=self.inter)                     # 2. all-reduce across nodes
            self.bytes_sent += nbytes
        if self.n_local > 1:
            dist.broadcast(flat, src=self.leader, group=self.intra)     # 3. result back inside the node
            self.bytes_sent += nbytes
        self.calls += 1
        return flat


def ddp_comm_hook(state: HierarchicalAllReduce, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket with a hierarchical all-reduce (synchronously)."""
    buf = bucket.buffer()
    buf.div_(state.size)
    state(buf)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buf)
    return fut
