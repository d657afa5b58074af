"""Physical structured pruning of BERT encoder layers: heads and FFN channels.

Works on any module tree holding HuggingFace ``BertLayer``-shaped blocks
(``attention.self.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``), so it applies to ``BertModel`` and to
dsframe's ``BertClassifier`` alike. Linear subclasses (torchao's fake-quantized
Linear) are sliced in place too, so pruning composes with QAT in either order.

Masking (``apply_masks``) zeroes exactly the parameters that ``slice_layers`` removes,
and the zeroed structures contribute exactly 0 (value rows 0 -> head context 0;
GELU(0) = 0 for FFN channels), so a masked model and its sliced copy compute the same
function.
"""
from __future__ import annotations

import torch
from torch import nn


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The BERT layers of ``model`` in order (empty list when there are none)."""
    return [m for m in model.modules()
            if hasattr(m, "attention") and hasattr(m, "intermediate") and hasattr(m, "output")
            and hasattr(getattr(m.attention, "self", None), "query")]


def layer_list(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The (parent, attribute) of the ModuleList that holds the encoder layers."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) and all(
                    hasattr(m, "attention") and hasattr(m, "intermediate") for m in child):
                return parent, name
    return None


@torch.no_grad()
def drop_layers(model: nn.Module, keep: list[int]) -> None:
    """Physically remove whole encoder layers, keeping the (sorted) indices ``keep``."""
    found = layer_list(model)
    if found is None:
        raise ValueError("drop_layers: no encoder layer list in this model")
    parent, name = found
    layers = getattr(parent, name)
    keep = sorted(set(keep))
    if not keep or keep[-1] >= len(layers) or keep[0] < 0:
        raise ValueError(f"drop_layers: bad layer indices {keep} for {len(layers)} layers")
    new = nn.ModuleList([layers[i] for i in keep])
    for i, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    setattr(parent, name, new)
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if c is not None and hasattr(c, "num_hidden_layers")}
    for cfg in configs.values():
        # which layer of the unpruned model each kept layer was (saved with the config, so
        # layer-to-layer distillation can pair a student layer with its teacher layer)
        origin = getattr(cfg, "layer_origin", None) or list(range(len(layers)))
        cfg.layer_origin = [origin[i] for i in keep]
        cfg.num_hidden_layers = len(keep)


def layer_taylor(layer: nn.Module) -> float:
    """Σ |w · ∂L/∂w| over all parameters of one layer (0 without gradients)."""
    return float(sum((p.detach() * p.grad.detach()).abs().sum() for p in layer.parameters() if p.grad is not None))


def head_size(layer: nn.Module) -> int:
    return int(layer.attention.self.attention_head_size)


def num_heads(layer: nn.Module) -> int:
    return layer.attention.self.query.out_features // head_size(layer)


def ffn_width(layer: nn.Module) -> int:
    return layer.intermediate.dense.out_features


def _head_rows(layer: nn.Module, heads: torch.Tensor) -> torch.Tensor:
    d = head_size(layer)
    return (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)


# -- importance ---------------------------------------------------------------------------

def head_scores(layer: nn.Module, use_grad: bool = False) -> torch.Tensor:
    """Per-head sum of |w| (or |w * grad| when ``use_grad``) over q, k, v rows and the
    attention output columns of that head."""
    att = layer.attention
    h, d = num_heads(layer), head_size(layer)

    def val(p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None:
            return None
        if use_grad:
            return None if p.grad is None else (p.detach() * p.grad.detach()).abs()
        return p.detach().abs()

    total = torch.zeros(h)
    for lin in (att.self.query, att.self.key, att.self.value):
        w, b = val(lin.weight), val(lin.bias)
        if w is not None:
            total += w.reshape(h, d, -1).sum(dim=(1, 2)).float().cpu()
        if b is not None:
            total += b.reshape(h, d).sum(dim=1).float().cpu()
    w = val(att.output.dense.weight)
    if w is not None:
        total += w.reshape(w.shape[0], h, d).sum(dim=(0, 2)).float().cpu()
    return total


def ffn_scores(layer: nn.Module, use_grad: bool = False) -> torch.Tensor:
    """Per-channel sum of |w| (or |w * grad|) over the intermediate row, its bias and the
    output column of that channel."""
    def val(p):
        if p is None:
            return None
        if use_grad:
            return None if p.grad is None else (p.detach() * p.grad.detach()).abs()
        return p.detach().abs()

    total = torch.zeros(ffn_width(layer))
    w, b = val(layer.intermediate.dense.weight), val(layer.intermediate.dense.bias)
    if w is not None:
        total += w.sum(dim=1).float().cpu()
    if b is not None:
        total += b.float().cpu()
    w = val(layer.output.dense.weight)
    if w is not None:
        total += w.sum(dim=0).float().cpu()
    return total


def mix_importance(l1: torch.Tensor, taylor: torch.Tensor | None, taylor_weight: float) -> torch.Tensor:
    """(1 - λ)·L1/mean(L1) + λ·Taylor/mean(Taylor): each term scale-free, then mixed.

    Without gradient statistics (``taylor`` None or all zero) the ranking is L1 only."""
    l1n = l1 / l1.mean().clamp_min(1e-12)
    if taylor is None or float(taylor.sum()) == 0.0 or taylor_weight == 0.0:
        return l1n
    tn = taylor / taylor.mean().clamp_min(1e-12)
    return (1.0 - taylor_weight) * l1n + taylor_weight * tn


def choose_keep(importance: torch.Tensor, alive: torch.Tensor, n_keep: int) -> torch.Tensor:
    """A boolean keep-mask of ``n_keep`` entries: the most important among the ``alive``
    ones (pruned entries never come back)."""
    n_keep = max(0, min(int(n_keep), int(alive.sum())))
    score = importance.clone().float()
    score[~alive] = float("-inf")
    keep = torch.zeros_like(alive)
    if n_keep:
        keep[torch.topk(score, n_keep).indices] = True
    return keep


# -- masking (during training) and slicing (at the end) -----------------------------------

@torch.no_grad()
def apply_masks(layers: list[nn.Module], head_masks: list[torch.Tensor], ffn_masks: list[torch.Tensor]) -> None:
    """Zero every parameter that slicing would remove (in place, keeps shapes)."""
    for layer, hm, fm in zip(layers, head_masks, ffn_masks):
        att = layer.attention
        dead = _head_rows(layer, (~hm).nonzero().flatten())
        if dead.numel():
            for lin in (att.self.query, att.self.key, att.self.value):
                lin.weight[dead.to(lin.weight.device)] = 0
                if lin.bias is not None:
                    lin.bias[dead.to(lin.bias.device)] = 0
            att.output.dense.weight[:, dead.to(att.output.dense.weight.device)] = 0
        dead_c = (~fm).nonzero().flatten()
        if dead_c.numel():
            inter, out = layer.intermediate.dense, layer.output.dense
            inter.weight[dead_c.to(inter.weight.device)] = 0
            if inter.bias is not None:
                inter.bias[dead_c.to(inter.bias.device)] = 0
            out.weight[:, dead_c.to(out.weight.device)] = 0


def _slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0: outputs) or columns (dim 1: inputs) ``idx`` of ``lin`` in place."""
    idx = idx.to(lin.weight.device)
    w = lin.weight.detach().index_select(dim, idx).clone()
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach()[idx].clone(), requires_grad=lin.bias.requires_grad)
        lin.out_features = w.shape[0]
    else:
        lin.in_features = w.shape[1]


@torch.no_grad()
def slice_layer(layer: nn.Module, keep_heads: torch.Tensor, keep_ffn: torch.Tensor) -> None:
    """Physically remove the heads / FFN channels whose mask entry is False.

    A layer keeps at least one head (attention with zero heads has no shape here)."""
    att = layer.attention
    heads = keep_heads.nonzero().flatten()
    if heads.numel() == 0:
        raise ValueError("slice_layer: at least one head must be kept per layer")
    if heads.numel() < keep_heads.numel():
        rows = _head_rows(layer, heads)
        for lin in (att.self.query, att.self.key, att.self.value):
            _slice_linear(lin, rows, 0)
        _slice_linear(att.output.dense, rows, 1)
        att.self.num_attention_heads = int(heads.numel())
        att.self.all_head_size = int(rows.numel())
    chans = keep_ffn.nonzero().flatten()
    if chans.numel() == 0:  # keep one zeroed channel: the FFN then adds only its bias
        chans = torch.tensor([0])
        layer.intermediate.dense.weight[0] = 0
        if layer.intermediate.dense.bias is not None:
            layer.intermediate.dense.bias[0] = 0
    if chans.numel() < keep_ffn.numel():
        _slice_linear(layer.intermediate.dense, chans, 0)
        _slice_linear(layer.output.dense, chans, 1)


def slice_layers(layers, head_masks, ffn_masks) -> None:
    for layer, hm, fm in zip(layers, head_masks, ffn_masks):
        slice_layer(layer, hm, fm)


def shape_summary(model: nn.Module) -> dict:
    layers = encoder_layers(model)
    return {"heads": [num_heads(l) for l in layers], "ffn": [ffn_width(l) for l in layers],
            "params": sum(p.numel() for p in model.parameters())}
