"""Hierarchical all-reduce: equal to a flat all-reduce, as a tensor op and as a DDP comm hook."""
import pytest
import torch
import torch.distributed as dist

from tests._dist_util import run_forked

from dsframe.parallel.comm import partition_by_node


def test_partition_by_node():
    parts = partition_by_node([[0, 2, 4, 6], [1, 3, 5, 7]], lambda r: r // 4)
    assert parts[0] == ({0: [0, 2], 1: [4, 6]}, [0, 4])
    assert parts[1] == ({0: [1, 3], 1: [5, 7]}, [1, 5])


def _worker(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dsframe.parallel.comm import HierarchicalAllReduce, ddp_comm_hook

    # 1. the op: 4 ranks as 2 nodes × 2
    h = HierarchicalAllReduce.for_world(ranks_per_node=2)
    x = torch.arange(5, dtype=torch.float64) * (rank + 1) + rank ** 2
    flat = x.clone()
    dist.all_reduce(flat)
    hier = h(x.clone())
    op_err = (hier - flat).abs().max().item()
    # leaders (ranks 0, 2) send 3 times (reduce, all-reduce, broadcast), the others twice
    sent = h.bytes_sent // (5 * 8)
    # 2. the DDP hook: same gradients as DDP's default all-reduce after a step on different data
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    a, b = DDP(net), DDP(torch.nn.Sequential(*[m for m in __import__("copy").deepcopy(net)]))
    b.register_comm_hook(HierarchicalAllReduce.for_world(ranks_per_node=2), ddp_comm_hook)
    g = torch.Generator().manual_seed(rank)
    xb, yb = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    for m in (a, b):
        torch.nn.functional.mse_loss(m(xb), yb).backward()
    hook_err = max((p.grad - q.grad).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    spread = max(p.grad.abs().max().item() for p in a.parameters())
    res = torch.tensor([op_err, hook_err, float(sent), spread], dtype=torch.float64)
    every = [torch.zeros_like(res) for _ in range(world)]
    dist.all_gather(every, res)
    if rank == 0:
        torch.save(torch.stack(every), out)


@pytest.mark.slow
def test_hierarchical_equals_flat_all_reduce_and_works_as_ddp_hook(tmp_path):
    out = run_forked(_worker, 4, tmp_path)
    res = torch.load(out)
    assert res[:, 0].max() <= 1e-12                      # the op equals a flat sum
    assert res[:, 1].max() <= 1e-6                       # DDP with the hook = DDP's own all-reduce
    assert res[:, 2].tolist() == [3.0, 2.0, 3.0, 2.0]     # only node leaders cross nodes
    assert res[:, 3].min() > 1e-3                          # the gradients are not trivially zero
