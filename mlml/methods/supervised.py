"""The plain supervised method: one registered loss on the observed labels of each batch."""

from __future__ import annotations

import torch

from mlml.config import MethodConfig
from mlml.methods.base import Method, MethodContext, build_supervised_loss, pos_weight_from_counts, register_method
from mlml.settings import NoSettings

__all__ = ["Supervised", "build_supervised_loss", "pos_weight_from_counts"]


@register_method("supervised")
class Supervised(Method):
    """`loss(logits, targets, observed)` with the configured loss from `mlml.losses` (`method.loss`,
    `method.loss_args`, `method.pos_weight`); no `method.args`."""

    Settings = NoSettings

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.loss = build_supervised_loss(cfg, ctx)

    def objective(self, outputs: dict[str, dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = outputs["image"]["logits"].float()                   # (B, C)
        return {"loss": self.loss(logits, batch["targets"], batch["observed"])}
