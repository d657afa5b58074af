"""distill: knowledge distillation from a teacher model file (soft labels at temperature τ).

loss = α · KL(p_teacher ‖ p_student) · τ² + (1 − α) · CE(student, labels)
       + β · mean over student layers of MSE(h_student, h_teacher)      (``hidden_weight`` β)
with p = softmax(logits / τ) and KL averaged over the batch. The hidden-state term (off by
default) pairs each student encoder layer with the teacher layer it was pruned from (the
``layer_origin`` the prune plugin records when it drops layers), else with the teacher layer at
the same relative depth, and averages the squared error over real (unpadded) tokens.
The teacher is a finished stage's artifact (``teacher: <stage name>``) or a model file path;
it runs in eval mode without gradients and is never part of the student's parameters or
checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dsframe.batch import call_model
from dsframe.errors import CheckpointError, ConfigError, DsframeError
from dsframe.plugin import Plugin
from dsframe_distill.config import DistillConfig

__all__ = ["DistillPlugin", "DistillConfig", "distill_loss"]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ce: torch.Tensor,
                 temperature: float, alpha: float) -> torch.Tensor:
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return alpha * kl * t * t + (1.0 - alpha) * ce


# arch fields a teacher must share with its student (pruned shapes may differ)
_SAME = ("num_labels",)
_SAME_HF = ("vocab_size", "hidden_size", "model_type")


def check_teacher(teacher_arch: dict, student_arch: dict, where: str) -> None:
    diffs = [f"{k}: teacher {teacher_arch.get(k)!r} vs student {student_arch.get(k)!r}"
             for k in _SAME if teacher_arch.get(k) != student_arch.get(k)]
    th, sh = teacher_arch.get("hf_config", {}), student_arch.get("hf_config", {})
    diffs += [f"{k}: teacher {th.get(k)!r} vs student {sh.get(k)!r}" for k in _SAME_HF if th.get(k) != sh.get(k)]
    if diffs:
        raise CheckpointError(f"teacher {where} is of another architecture than the student ({'; '.join(diffs)})")


def layer_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for the hidden-state term."""
    from dsframe_compress.structure import encoder_layers

    n_s, n_t = len(encoder_layers(student)), len(encoder_layers(teacher))
    cfg = next((m.config for m in student.modules() if hasattr(getattr(m, "config", None), "num_hidden_layers")), None)
    origin = list(getattr(cfg, "layer_origin", None) or [])
    if len(origin) == n_s and all(0 <= o < n_t for o in origin) and n_t > n_s:
        return list(enumerate(origin))
    return [(i, (i + 1) * n_t // n_s - 1) for i in range(n_s)]


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Squared error averaged over hidden units and over the tokens where ``mask`` is 1."""
    err = (a.float() - b.float()).pow(2).mean(-1)
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1.0)


class _LayerTap:
    """Keeps the last output hidden states of each encoder layer of a module (forward hooks)."""

    def __init__(self, model: nn.Module):
        from dsframe_compress.structure import encoder_layers

        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(encoder_layers(model))]

    def _hook(self, i: int):
        def hook(module, args, out):
            self.outputs[i] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.outputs = [], {}


class DistillPlugin(Plugin):
    name: ClassVar[str] = "distill"
    description: ClassVar[str] = DistillConfig.description
    Config: ClassVar[type] = DistillConfig

    def __init__(self, config: DistillConfig, context=None):
        super().__init__(config, context)
        self.teacher: nn.Module | None = None
        self.pairs: list[tuple[int, int]] = []
        self.taps: tuple[_LayerTap, _LayerTap] | None = None

    def teacher_path(self) -> Path:
        ref = self.config.teacher
        ctx = self.context
        if ctx is not None and "/" not in ref and not ref.endswith(".pt"):
            try:
                return Path(ctx.artifact(ref))
            except Exception as exc:
                raise ConfigError("plugins.distill.teacher", ref,
                                  f"a finished stage of this run or a model file ({exc})") from None
        return Path(ref)

    def transform(self, model: nn.Module) -> nn.Module:
        from dsframe.models.files import load_model, read_model_file

        path = self.teacher_path()
        payload = read_model_file(path)  # CheckpointError on missing / corrupt files
        if hasattr(model, "kind") and payload["kind"] != model.kind:
            raise CheckpointError(f"teacher {path} is a '{payload['kind']}' model; the student is '{model.kind}'")
        if hasattr(model, "arch"):
            check_teacher(payload["arch"], model.arch(), str(path))
            if self.config.hidden_weight > 0 and "hf_config" not in model.arch():
                # the hidden-state term pairs BERT encoder layers over a text attention mask
                raise ConfigError("plugins.distill.hidden_weight", self.config.hidden_weight,
                                  f"0 for a '{getattr(model, 'kind', type(model).__name__)}' student: layer-to-layer "
                                  "distillation needs a BERT-family classifier (kind bert); logit distillation "
                                  "(hidden_weight=0) works for any model")
        self.set_teacher(load_model(path))
        return model

    def set_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval().requires_grad_(False)

    def tap_layers(self, student: nn.Module) -> None:
        """Hooks on the paired layers; at fit start, when every plugin has shaped the student."""
        self.pairs = layer_pairs(student, self.teacher)
        if not self.pairs:
            raise DsframeError("plugins.distill.hidden_weight > 0 needs BERT-family encoder layers "
                               "in the student and the teacher")
        self.taps = (_LayerTap(student), _LayerTap(self.teacher))

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.teacher is not None:
            self.teacher.to(pl_module.device)
            if self.config.hidden_weight > 0 and self.taps is None:
                self.tap_layers(pl_module)

    def loss(self, task, batch, outputs, loss):
        if self.teacher is None or "labels" not in batch:
            return None
        self.teacher.eval()
        with torch.no_grad():
            t_logits = call_model(self.teacher, batch).float()
        total = distill_loss(outputs.float(), t_logits, loss, self.config.temperature, self.config.alpha)
        if self.taps is not None:
            (s_out, t_out), mask = (t.outputs for t in self.taps), batch.get("attention_mask")
            hidden = sum(masked_mse(s_out[i], t_out[j], mask) for i, j in self.pairs) / len(self.pairs)
            total = total + self.config.hidden_weight * hidden
            if task is not None:
                task.log("distill/hidden_mse", hidden.detach(), batch_size=outputs.shape[0])
        return total

    def finalize(self, model: nn.Module) -> nn.Module:
        if self.taps is not None:
            for tap in self.taps:
                tap.remove()
        self.teacher, self.taps = None, None  # only training needs them; free the memory
        return model
