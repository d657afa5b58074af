"""The BERT encoder's tensor-parallel plan: 2 forked ranks (gloo) give one process's logits and grads."""
import pytest
import torch

from tests._dist_util import run_forked

transformers = pytest.importorskip("transformers")


def _build():
    from dsframe.models.bert import BertClassifier

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    enc = transformers.BertModel(cfg, add_pooling_layer=False)
    return BertClassifier(enc, num_labels=3, pooling="mean", dropout=0.0)


def _worker(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    model = _build()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    y = torch.tensor([0, 2, 1])
    ref = model(ids, mask)                                          # one process, on every rank
    torch.nn.functional.cross_entropy(ref, y).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    parallelize_module(model, mesh, model.tp_plan())
    q = model.encoder.encoder.layer[0].attention.self.query.weight
    assert isinstance(q, DTensor) and q.to_local().shape == (32 // world, 32)
    out_tp = model(ids, mask)
    torch.nn.functional.cross_entropy(out_tp, y).backward()
    err = (out_tp - ref).abs().max().item()
    for n, p in model.named_parameters():
        gr = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        err = max(err, (gr - ref_grads[n]).abs().max().item())
    if rank == 0:
        torch.save({"err": err}, out)


@pytest.mark.slow
def test_bert_tp2_matches_one_process(tmp_path):
    out = run_forked(_worker, 2, tmp_path)
    assert torch.load(out)["err"] <= 1e-5
