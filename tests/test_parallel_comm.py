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


def _overlap_worker(rank, world, out):
    from dsframe.parallel.overlap import OverlappedGradSync

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3))
    params = list(net.parameters())
    sync = OverlappedGradSync(params, dist.group.WORLD, world, bucket_bytes=1)   # one parameter per bucket
    started_before_first_layer = []
    # registered after the sync's hook: runs once the first layer's weight gradient is final, i.e. at
    # the very end of backward; by then every later layer's bucket must already be on its way
    params[0].register_post_accumulate_grad_hook(lambda p: started_before_first_layer.append(len(sync.launched)))
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    torch.nn.functional.mse_loss(net(x), y).backward()                # not armed: nothing sent
    assert not sync.launched and sync.calls == 0
    local = [p.grad.clone() for p in params]
    net.zero_grad()
    sync.arm()
    torch.nn.functional.mse_loss(net(x), y).backward()
    sync.finish()
    expect = []
    for g_ in local:
        g_ = g_.clone()
        dist.all_reduce(g_)
        expect.append(g_ / world)
    err = max((p.grad - e).abs().max().item() for p, e in zip(params, expect))
    res = torch.tensor([err, float(started_before_first_layer[-1]), float(len(sync.buckets)), float(sync.calls)])
    if rank == 0:
        torch.save(res, out)


@pytest.mark.slow
def test_overlapped_buckets_start_during_backward_and_average(tmp_path):
    res = torch.load(run_forked(_overlap_worker, 2, tmp_path))
    err, started, buckets, calls = res.tolist()
    assert err <= 1e-7                          # the dp average, as a flat all-reduce gives it
    assert buckets == calls == 6                # one bucket per parameter, each sent once
    assert started >= 4                         # 4 later buckets started before backward reached layer 0


def _hierarchical_overlap_worker(rank, world, out):
    import threading

    from dsframe.parallel.comm import HierarchicalAllReduce
    from dsframe.parallel.overlap import OverlappedGradSync

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3))
    params = list(net.parameters())
    h = HierarchicalAllReduce.for_world(ranks_per_node=2)
    backward_done = threading.Event()
    seen = []     # per bucket chain: (backward had ended when the chain was allowed to go on, its thread)

    def chain(flat):
        # a chain started inside a gradient hook would block backward: it could never see its end
        seen.append((backward_done.wait(timeout=20), threading.current_thread().name))
        return h(flat)
    chain.bytes_sent = 0
    sync = OverlappedGradSync(params, dist.group.WORLD, world, bucket_bytes=1, hierarchical=chain)
    params[0].register_post_accumulate_grad_hook(lambda p: backward_done.set())   # the end of backward
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    torch.nn.functional.mse_loss(net(x), y).backward()
    local = [p.grad.clone() for p in params]
    net.zero_grad()
    backward_done.clear()
    sync.arm()
    torch.nn.functional.mse_loss(net(x), y).backward()
    sync.finish()
    sync.remove()
    expect = []
    for g_ in local:
        g_ = g_.clone()
        dist.all_reduce(g_)
        expect.append(g_ / world)
    err = max((p.grad - e).abs().max().item() for p, e in zip(params, expect))
    res = torch.tensor([err, float(len(seen)), float(all(ok for ok, _ in seen)),
                        float(all(name.startswith("dsframe-hier-allreduce") for _, name in seen))])
    every = [torch.zeros_like(res) for _ in range(world)]
    dist.all_gather(every, res)
    if rank == 0:
        torch.save(torch.stack(every), out)


@pytest.mark.slow
def test_hierarchical_buckets_run_beside_backward_and_average(tmp_path):
    res = torch.load(run_forked(_hierarchical_overlap_worker, 4, tmp_path))
    assert res[:, 0].max() <= 1e-6            # the dp average over 2 nodes × 2 ranks, as a flat all-reduce
    assert res[:, 1].tolist() == [6.0] * 4    # one chain per bucket (one parameter each)
    assert res[:, 2].tolist() == [1.0] * 4    # every chain waited for the end of backward without blocking it
    assert res[:, 3].tolist() == [1.0] * 4    # ... on the helper thread
