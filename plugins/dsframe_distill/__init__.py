"""distill: knowledge distillation from a teacher model file (soft labels at temperature τ).

loss = α · KL(p_teacher ‖ p_student) · τ² + (1 − α) · CE(student, labels), with
p = softmax(logits / τ) and KL averaged over the batch. The teacher is a finished stage's
artifact (``teacher: <stage name>``) or a model file path; it runs in eval mode without
gradients and is never part of the student's parameters or checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dsframe.errors import ConfigError
from dsframe.plugin import Plugin
from dsframe.errors import CheckpointError

__all__ = ["DistillPlugin", "DistillConfig", "distill_loss"]


@dataclass
class DistillConfig:
    teacher: str = "teacher"   # a finished stage of this run, or a path to a dsframe model file
    temperature: float = 3.0   # τ
    alpha: float = 0.7         # weight of the soft-label term

    def __post_init__(self):
        if not (self.temperature > 0):
            raise ConfigError("plugins.distill.temperature", self.temperature, "a float > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("plugins.distill.alpha", self.alpha, "a float in [0, 1]")
        if not self.teacher:
            raise ConfigError("plugins.distill.teacher", self.teacher, "a stage name or a model file path")


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


class DistillPlugin(Plugin):
    name: ClassVar[str] = "distill"
    description: ClassVar[str] = "knowledge distillation from a teacher: α·KL·τ² + (1-α)·CE, τ=3"
    Config: ClassVar[type] = DistillConfig

    def __init__(self, config: DistillConfig, context=None):
        super().__init__(config, context)
        self.teacher: nn.Module | None = None

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
        from dsframe.models import load_model, read_model_file

        path = self.teacher_path()
        payload = read_model_file(path)  # CheckpointError on missing / corrupt files
        if hasattr(model, "kind") and payload["kind"] != model.kind:
            raise CheckpointError(f"teacher {path} is a '{payload['kind']}' model; the student is '{model.kind}'")
        if hasattr(model, "arch"):
            check_teacher(payload["arch"], model.arch(), str(path))
        self.teacher = load_model(path).eval().requires_grad_(False)
        return model

    def set_teacher(self, teacher: nn.Module) -> None:
        self.teacher = teacher.eval().requires_grad_(False)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.teacher is not None:
            self.teacher.to(pl_module.device)

    def loss(self, task, batch, outputs, loss):
        if self.teacher is None or "labels" not in batch:
            return None
        self.teacher.eval()
        with torch.no_grad():
            kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            t_logits = self.teacher(**kwargs).float()
        return distill_loss(outputs.float(), t_logits, loss, self.config.temperature, self.config.alpha)

    def finalize(self, model: nn.Module) -> nn.Module:
        self.teacher = None  # only training needs it; free the memory before the next stage
        return model
