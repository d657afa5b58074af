"""labelsmooth: label smoothing of the hard-label cross-entropy term (Szegedy et al. 2016).

CE_ε = (1 − ε)·CE(p, y) + ε·mean_c(−log p_c). The plugin adds CE_ε − CE to the loss it is
given, so alone it turns the task's cross-entropy into CE_ε, and before distill (``runs_before``)
it smooths distill's hard-label term: α·KL·τ² + (1 − α)·CE_ε.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from dsframe import ConfigError, Plugin


@dataclass
class LabelSmoothConfig:
    epsilon: float = 0.1  # ε: probability mass spread uniformly over the classes

    def __post_init__(self):
        if not 0.0 <= self.epsilon < 1.0:
            raise ConfigError("plugins.labelsmooth.epsilon", self.epsilon, "a float in [0, 1)")


class LabelSmoothPlugin(Plugin):
    name = "labelsmooth"
    description = "label smoothing of the cross-entropy term: (1-ε)·CE + ε·uniform"
    Config = LabelSmoothConfig
    runs_before = ("distill",)  # distill mixes the loss it receives as its hard-label term

    def loss(self, task, batch, outputs, loss):
        if self.config.epsilon == 0.0 or "labels" not in batch:
            return None
        logits = outputs.float().reshape(-1, outputs.shape[-1])  # [B, C] or [B, T, V] alike
        labels = batch["labels"].reshape(-1)
        hard = F.cross_entropy(logits, labels)
        smooth = F.cross_entropy(logits, labels, label_smoothing=self.config.epsilon)
        if task is not None:
            task.log("labelsmooth/delta", (smooth - hard).detach(), batch_size=labels.shape[0])
        return loss + (smooth - hard)
