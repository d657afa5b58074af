"""A GPT-style decoder LM in one file (after nanoGPT), with its tensor-parallel plan next to it.

    model = GPT.build(GPTConfig(vocab_size=256, n_layer=4, n_head=4, n_embd=128))
    logits = model(input_ids)            # [B, T, vocab]

Built to be split two ways:

* tensor parallel — q, k and v are separate ``nn.Linear`` (a fused qkv would be split across the
  q/k/v boundary by a column-wise shard); attention reshapes with ``view(B, T, -1, head_dim)`` so a
  rank holding n_head/tp heads runs unchanged. :func:`tp_plan` says which layer is sharded how.
* pipeline parallel — blocks live in an ``nn.ModuleDict`` keyed by layer index, and embeddings,
  final norm and head may be ``None``: :meth:`GPT.pipeline_stage` keeps a contiguous slice and the
  parameter names stay those of the whole model (``blocks.3.attn.q.weight``), so checkpoints of
  any pipeline layout are interchangeable.

Both through the parallel contract of :mod:`dsframe.parallel.contract` (``tp_plan``,
``tp_divisible``, ``pipeline_units``, ``pipeline_stage``, ``pipeline_inputs``, ``layer_flops``).

The LM head is not tied to the token embedding (tying across pipeline stages needs an extra
all-reduce per step; small models lose little).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from dsframe.models.gpt_config import GPTConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.head_dim = c.n_embd // c.n_head
        self.q = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.k = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.v = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = c.dropout

    def forward(self, x):
        B, T, _ = x.shape
        # -1 heads: under tensor parallel this rank holds n_head / tp of them
        q, k, v = (lin(x).view(B, T, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = MLP(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """Token + position embedding → n_layer pre-norm blocks → LayerNorm → LM head."""

    kind: ClassVar[str] = "gpt"
    offers_sequence_parallel: ClassVar[bool] = True     # tp_plan(sequence_parallel=True) exists
    description: ClassVar[str] = GPTConfig.description
    Config: ClassVar[type] = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(c) for i in range(c.n_layer)})
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, config: GPTConfig) -> "GPT":
        return cls(config)

    @classmethod
    def from_arch(cls, arch: dict) -> "GPT":
        return cls(GPTConfig(**arch["config"]))

    def arch(self) -> dict:
        return {"config": asdict(self.config)}

    # -- forward ------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None):
        """``input_ids`` [B, T] → logits [B, T, vocab]. A pipeline stage without the embedding
        takes hidden states [B, T, C] instead; one without the head returns hidden states.
        ``attention_mask`` is accepted for interface parity and ignored (causal LM, no padding)."""
        x = input_ids
        if self.wte is not None:
            T = x.shape[1]
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens > block_size {self.config.block_size}")
            pos = torch.arange(T, device=x.device)
            x = self.drop(self.wte(x) + self.wpe(pos))
        for block in self.blocks.values():
            x = block(x)
        if self.lm_head is not None:
            x = self.lm_head(self.ln_f(x))
        return x

    # -- pipeline -----------------------------------------------------------------------
    def pipeline_units(self) -> list[str]:
        """The layers a pipeline may cut between, in order (embedding and head go with the end blocks)."""
        return list(self.blocks.keys())

    def pipeline_stage(self, layers: list[str], first: bool, last: bool) -> "GPT":
        """A copy holding only ``layers`` (+ embeddings if ``first``, + norm and head if ``last``)."""
        keep = set(layers)
        stage = copy.copy(self)          # shallow: share nothing we then mutate
        stage._modules = dict(self._modules)
        stage.blocks = nn.ModuleDict({k: copy.deepcopy(b) for k, b in self.blocks.items() if k in keep})
        stage.wte = copy.deepcopy(self.wte) if first else None
        stage.wpe = copy.deepcopy(self.wpe) if first else None
        stage.ln_f = copy.deepcopy(self.ln_f) if last else None
        stage.lm_head = copy.deepcopy(self.lm_head) if last else None
        return stage

    def pipeline_inputs(self, batch: dict) -> tuple:
        return (batch["input_ids"],)

    def pipeline_example(self, batch_size: int, seq_len: int | None = None) -> dict:
        T = seq_len or self.config.block_size
        return {"input_ids": torch.randint(0, self.config.vocab_size, (batch_size, T))}

    def layer_flops(self, seq_len: int | None = None) -> dict[str, float]:
        """Forward FLOPs per token of each pipeline unit (+ 'embed', 'head'): for stage balancing."""
        c = self.config
        seq_len = seq_len or c.block_size
        block = 24 * c.n_embd ** 2 + 4 * seq_len * c.n_embd  # 12 C² weights ×2, QKᵀ and AV
        out = {k: float(block) for k in self.blocks}
        out["embed"] = float(2 * c.n_embd)
        out["head"] = float(2 * c.n_embd * c.vocab_size)
        return out

    # -- tensor parallel ----------------------------------------------------------------
    def tp_plan(self, sequence_parallel: bool = False) -> dict:
        return tp_plan(self, sequence_parallel=sequence_parallel)

    def tp_divisible(self) -> dict[str, int]:
        c = self.config
        return {"model.n_head": c.n_head, "model.n_embd": c.n_embd, "model.vocab_size": c.vocab_size}


def tp_plan(model: GPT, sequence_parallel: bool = False) -> dict:
    """Megatron-style tensor-parallel plan for :class:`GPT` (or a pipeline stage of it).

    Attention: q, k, v column-wise (each rank gets n_head/tp whole heads), proj row-wise (one
    all-reduce in forward, one in backward). MLP: fc column-wise, proj row-wise (ditto). LM head
    column-wise over the vocabulary with the logits gathered (Replicate) so the loss sees the whole
    vocabulary. Embeddings and LayerNorms stay replicated, and the residual stream between blocks is
    a plain replicated tensor, so pipeline stages pass ordinary tensors.

    ``sequence_parallel`` (no pipeline): the residual stream and the LayerNorms are sharded along the
    sequence (Shard(1) DTensors, sequence length divisible by tp); each all-reduce becomes an
    all-gather before the column-wise layers and a reduce-scatter after the row-wise ones.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    plan: dict = {}
    sp = sequence_parallel
    keys = list(model.blocks.keys())
    for i in keys:
        p = f"blocks.{i}"
        if sp:
            if i == keys[0]:   # the embeddings' output enters the first block replicated: shard it
                plan[p] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                             use_local_output=False)
            plan[f"{p}.ln_1"] = SequenceParallel()
            plan[f"{p}.ln_2"] = SequenceParallel()
            for sub in ("attn", "mlp"):
                plan[f"{p}.{sub}"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                        desired_input_layouts=(Replicate(),))
        for name in ("attn.q", "attn.k", "attn.v", "mlp.fc"):
            plan[f"{p}.{name}"] = ColwiseParallel()
        for name in ("attn.proj", "mlp.proj"):
            plan[f"{p}.{name}"] = (RowwiseParallel(output_layouts=Shard(1), use_local_output=False) if sp
                                   else RowwiseParallel())
    if model.lm_head is not None:
        if sp:
            plan["ln_f"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Replicate())
    return plan
