"""Product quantization of embedding rows: each row is cut into sub-vectors of ``dim`` values
(4 by default), and each sub-vector is stored as the 1-byte index of its nearest centroid
(k-means, 256 centroids per sub-space, fp16 codebooks). A 384-wide row then costs 96 bytes
instead of 384 at int8; measured on MiniLM's rows: cosine 0.95 to the original row.

The int8 export uses it for the vocabulary rows that the training split never used: they are
too many to keep at int8 (17,694 of MiniLM's 30,522 rows, 6.8 MB), yet 31 % of the test
sentences of the movie-review data hold at least one of them, and reading a stand-in row
(the nearest kept token, or [UNK]) moved test accuracy by -1.5 to +0.7 points from model to
model where product-quantized rows stayed within noise of the full table.
"""
from __future__ import annotations

import torch


def subvector_dim(width: int, preferred: int = 4) -> int:
    """The largest sub-vector length <= ``preferred`` that divides ``width``."""
    return next(d for d in range(min(preferred, width), 0, -1) if width % d == 0)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0,
           sample: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of ``x``: (centroids [k, d], assignment [n]).

    Centroids are fitted on at most ``sample`` random rows (16 per centroid at k=256; on MiniLM
    rows, cosine to the original 0.950 against 0.954 fitting all 17,694 rows for 20 iterations,
    at a fifth of the time); every row is then assigned."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, x.shape[0])
    order = torch.randperm(x.shape[0], generator=g)
    fit = x[order[:sample]] if x.shape[0] > sample else x
    centroids = x[order[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(fit, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, fit)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)  # empty: keep
    return centroids, torch.cdist(x, centroids).argmin(dim=1)


@torch.no_grad()
def product_quantize(rows: torch.Tensor, dim: int | None = None, centroids: int = 256,
                     iters: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [n, M] (uint8) and codebooks [M, k, dim] (float16) with rows ≈ reconstruct(...)."""
    if centroids > 256:
        raise ValueError(f"centroids={centroids}: codes are bytes, at most 256")
    n, width = rows.shape
    dim = dim or subvector_dim(width)
    parts = rows.float().reshape(n, width // dim, dim).transpose(0, 1)  # [M, n, dim]
    books, codes = [], []
    for m, part in enumerate(parts):
        c, a = kmeans(part, centroids, iters, seed + m)
        books.append(torch.cat([c, c[-1:].expand(centroids - c.shape[0], dim)]) if c.shape[0] < centroids else c)
        codes.append(a)
    return torch.stack(codes, dim=1).to(torch.uint8), torch.stack(books).half()


def reconstruct(codes: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Rows [..., M·dim] from codes [..., M] (any integer type) and codebooks [M, k, dim]."""
    m, k, dim = books.shape
    flat = codes.long() + torch.arange(m, device=codes.device) * k  # index into all M·k centroids
    return books.reshape(m * k, dim)[flat].float().reshape(*codes.shape[:-1], m * dim)
