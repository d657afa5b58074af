"""prune: gradual structured pruning that physically removes attention heads and FFN channels.

Importance of a head / channel = (1 - taylor_weight) * L1 + taylor_weight * Taylor, each term
normalised by its per-layer mean; L1 = sum |w| over the structure's weights, Taylor = running
mean over training steps of sum |w * dL/dw|. During the stage the pruned fraction follows a
cubic schedule (Zhu & Gupta 2017) from 0 at ``start_fraction`` of the stage's training (in
samples: the task's ``progress``) to ``amount`` at ``end_fraction``; pruned structures are zeroed (masked) after every step.
``finalize`` reaches the final amount (even if training stopped early) and slices the
weights, so the saved model is physically smaller and reloads at its own shapes.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from dsframe.batch import call_model
from dsframe.errors import ConfigError, DsframeError
from dsframe.plugin import Plugin
from dsframe_compress import structure as S
from dsframe_prune.config import PruneConfig

__all__ = ["PrunePlugin", "PruneConfig", "cubic_schedule"]


def cubic_schedule(step: float, start: float, end: float, final: float) -> float:
    """Pruned fraction at ``step`` (a step count or a fraction of training): 0 before ``start``,
    ``final`` from ``end`` on, cubic between."""
    if step < start:
        return 0.0
    if step >= end or end <= start:
        return final
    t = (step - start) / (end - start)
    return final * (1.0 - (1.0 - t) ** 3)


def n_keep(n: int, fraction: float, minimum: int) -> int:
    return max(minimum, n - int(math.floor(n * fraction + 1e-9)))


class PrunePlugin(Plugin):
    name: ClassVar[str] = "prune"
    description: ClassVar[str] = PruneConfig.description
    Config: ClassVar[type] = PruneConfig

    def __init__(self, config: PruneConfig, context=None):
        super().__init__(config, context)
        self.layers: list[nn.Module] = []
        self.head_masks: list[torch.Tensor] = []
        self.ffn_masks: list[torch.Tensor] = []
        self.head_taylor: list[torch.Tensor] = []
        self.ffn_taylor: list[torch.Tensor] = []
        self.total_steps: int | None = None
        self.history: list[dict] = []

    # -- plugin hooks ---------------------------------------------------------------------
    def transform(self, model: nn.Module) -> nn.Module:
        self.layers = S.encoder_layers(model)
        if not self.layers:
            raise DsframeError(f"plugin 'prune' needs a BERT-family encoder; {type(model).__name__} has no "
                               "attention/FFN layers to prune")
        if self.config.drop_layers:
            self.drop_layers(model)
            self.layers = S.encoder_layers(model)
        self.head_masks = [torch.ones(S.num_heads(l), dtype=torch.bool) for l in self.layers]
        self.ffn_masks = [torch.ones(S.ffn_width(l), dtype=torch.bool) for l in self.layers]
        self.head_taylor = [torch.zeros(S.num_heads(l)) for l in self.layers]
        self.ffn_taylor = [torch.zeros(S.ffn_width(l)) for l in self.layers]
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        if not self.layers:
            self.transform(model)
        # With forked ranks (trainer.devices > 1) the masks grew in the ranks, not here; the
        # weights that came back carry them: a pruned head or channel is exactly zero.
        for i, layer in enumerate(self.layers):
            self.head_masks[i] &= S.head_scores(layer) > 0
            self.ffn_masks[i] &= S.ffn_scores(layer) > 0
        self.update_masks(self.config.heads, self.config.ffn)
        S.apply_masks(self.layers, self.head_masks, self.ffn_masks)
        S.slice_layers(self.layers, self.head_masks, self.ffn_masks)
        stage_dir = getattr(self.context, "stage_dir", None)
        if stage_dir is not None:  # the schedule as it happened, for people who want to look
            from dsframe.io import write_json

            write_json(stage_dir / "prune.json", {"config": vars(self.config), "history": self.history,
                                                  "final": S.shape_summary(model)})
        return model

    # -- Lightning hooks ------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.total_steps = max(1, int(trainer.estimated_stepping_batches))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.config.taylor_weight == 0.0:
            return
        d = self.config.taylor_decay
        for i, layer in enumerate(self.layers):
            self.head_taylor[i].mul_(d).add_((1 - d) * S.head_scores(layer, use_grad=True))
            self.ffn_taylor[i].mul_(d).add_((1 - d) * S.ffn_scores(layer, use_grad=True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # training progress: in samples when the task counts them (dsframe's Task.progress), so the
        # schedule stays right when the batch size changes mid-stage; else in optimizer steps
        progress = getattr(pl_module, "progress", None)
        if progress is None or not getattr(pl_module, "total_samples", 0):
            total = self.total_steps or max(1, int(trainer.estimated_stepping_batches))
            progress = step / total
        start, end = self.config.start_fraction, self.config.end_fraction
        if step % self.config.every_n_steps == 0 or progress >= end:
            hf = cubic_schedule(progress, start, end, self.config.heads)
            ff = cubic_schedule(progress, start, end, self.config.ffn)
            if self.update_masks(hf, ff):
                self.history.append({"step": step, "head_fraction": hf, "ffn_fraction": ff,
                                     "heads_kept": self.kept()[0], "ffn_kept": self.kept()[1]})
                pl_module.log("prune/heads_kept", float(self.kept()[0]))
        S.apply_masks(self.layers, self.head_masks, self.ffn_masks)  # optimizer may have revived them

    # -- pruning ----------------------------------------------------------------------------
    def layer_scores(self, model: nn.Module, batches) -> list[float]:
        """Taylor importance of each whole layer, Σ|w·∂L/∂w| summed over ``batches``."""
        import torch.nn.functional as F

        was_training = model.training
        model.train()
        model.zero_grad(set_to_none=True)
        for batch in batches:
            logits = call_model(model, batch)
            F.cross_entropy(logits, batch["labels"]).backward()
        scores = [S.layer_taylor(layer) for layer in S.encoder_layers(model)]
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return scores

    def drop_layers(self, model: nn.Module, batches=None) -> list[int]:
        """Remove ``drop_layers`` whole layers with the lowest Taylor score; returns kept indices."""
        n = len(S.encoder_layers(model))
        if self.config.drop_layers >= n:
            raise ConfigError("plugins.prune.drop_layers", self.config.drop_layers,
                              f"fewer than the model's {n} layers")
        if batches is None:
            dm = getattr(self.context, "datamodule", None)
            if dm is None:
                raise DsframeError("plugin 'prune' with drop_layers needs training data to score layers")
            if "train" not in getattr(dm, "splits", {"train": None}):
                dm.setup("fit")
            it = iter(dm.train_dataloader())
            batches = [next(it) for _ in range(self.config.calibration_batches)]
        scores = self.layer_scores(model, batches)
        order = sorted(range(n), key=lambda i: scores[i], reverse=True)
        keep = sorted(order[: n - self.config.drop_layers])
        S.drop_layers(model, keep)
        self.history.append({"step": 0, "layers_kept": keep, "layer_scores": scores})
        return keep

    def importance(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer, lam = self.layers[i], self.config.taylor_weight
        return (S.mix_importance(S.head_scores(layer), self.head_taylor[i], lam),
                S.mix_importance(S.ffn_scores(layer), self.ffn_taylor[i], lam))

    def update_masks(self, head_fraction: float, ffn_fraction: float) -> bool:
        """Shrink the masks to the given pruned fractions (per layer); True if anything changed."""
        changed = False
        for i, layer in enumerate(self.layers):
            hm, fm = self.head_masks[i], self.ffn_masks[i]
            kh = n_keep(hm.numel(), head_fraction, 1)
            kf = n_keep(fm.numel(), ffn_fraction, 1)
            if kh >= int(hm.sum()) and kf >= int(fm.sum()):
                continue
            h_imp, f_imp = self.importance(i)
            if kh < int(hm.sum()):
                self.head_masks[i] = S.choose_keep(h_imp, hm, kh)
                changed = True
            if kf < int(fm.sum()):
                self.ffn_masks[i] = S.choose_keep(f_imp, fm, kf)
                changed = True
        return changed

    def kept(self) -> tuple[int, int]:
        return int(sum(m.sum() for m in self.head_masks)), int(sum(m.sum() for m in self.ffn_masks))

    def state_dict(self) -> dict:
        return {"head_masks": self.head_masks, "ffn_masks": self.ffn_masks,
                "head_taylor": self.head_taylor, "ffn_taylor": self.ffn_taylor}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
