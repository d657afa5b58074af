"""Product quantization of embedding rows (dsframe_compress.pq) and its use for the vocabulary
rows the int8 export does not keep at int8."""
from __future__ import annotations

import torch

from dsframe_compress.int8 import Int8RowEmbedding
from dsframe_compress.pq import kmeans, product_quantize, reconstruct, subvector_dim


def test_subvector_dim_divides_the_width():
    assert subvector_dim(384) == 4 and subvector_dim(768) == 4
    assert subvector_dim(30) == 3 and subvector_dim(7) == 1 and subvector_dim(8, preferred=8) == 8


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found, assign = kmeans(x, 3, iters=20, seed=1)
    # every true cluster is one found cluster, and its centroid is the cluster mean
    for i in range(3):
        block = assign[50 * i: 50 * (i + 1)]
        assert (block == block[0]).all()
        torch.testing.assert_close(found[block[0]], x[50 * i: 50 * (i + 1)].mean(0))
    assert len(set(assign.tolist())) == 3


def test_rows_with_few_distinct_subvectors_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    palette = torch.randn(5, 4, generator=g)  # 5 distinct sub-vectors, 256 centroids available
    rows = palette[torch.randint(0, 5, (300, 6), generator=g)].reshape(300, 24).half().float()
    codes, books = product_quantize(rows, dim=4)
    assert codes.dtype == torch.uint8 and codes.shape == (300, 6) and books.shape == (6, 256, 4)
    torch.testing.assert_close(reconstruct(codes, books), rows, atol=0, rtol=0)


def test_embedding_keeps_int8_rows_and_product_quantizes_the_rest():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 32, generator=g)
    keep = torch.arange(0, 300)
    emb = Int8RowEmbedding(weight, keep_ids=keep, unk_id=100, unseen="pq")
    assert emb.q.shape == (300, 32) and emb.codes.shape == (700, 8) and emb.remap.dtype == torch.int16
    full = Int8RowEmbedding(weight)
    ids = torch.tensor([[5, 250, 700, 999]])
    out = emb(ids)
    torch.testing.assert_close(out[0, :2], full(ids)[0, :2])  # kept rows: the int8 rows
    torch.testing.assert_close(out[0, 2:], reconstruct(emb.codes[[400, 699]], emb.books))
    # a coded row is close to its own row, far closer than [UNK]'s
    cos = torch.nn.functional.cosine_similarity(out[0, 2:], weight[[700, 999]])
    assert (cos > 0.6).all()
    assert (cos > torch.nn.functional.cosine_similarity(weight[[100, 100]], weight[[700, 999]]) + 0.5).all()
