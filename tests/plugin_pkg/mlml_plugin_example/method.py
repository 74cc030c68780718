"""`consistency`: the configured supervised loss plus agreement between two augmented views."""

from __future__ import annotations

import math

import torch
from torch import nn

from mlml.config import MethodConfig
from mlml.methods import Method, MethodContext
from mlml.methods.supervised import build_supervised_loss


def ramp_up(step: int, ramp_steps: int) -> float:
    """Sigmoid-shaped ramp from 0 to 1 over `ramp_steps` optimiser steps (Laine & Aila, 2017)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return 1.0
    t = step / ramp_steps
    return math.exp(-5.0 * (1.0 - t) ** 2)


class Consistency(Method):
    """`loss(view 1) + weight * ramp * mean((p(view 1) - p(view 2))^2)` over all labels.

    The consistency term uses every label, observed or not: it is where the unobserved ones get
    a training signal. `method.args`: `weight` (default 1.0), `ramp_epochs` (default 1.0).
    """

    views = {"image": "weak", "image_two": "weak"}    # two independent draws of the weak augmentation

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        unknown = set(cfg.args) - {"weight", "ramp_epochs"}
        if unknown:
            raise ValueError(f"consistency: unknown method.args {sorted(unknown)}; known: ramp_epochs, weight")
        self.loss = build_supervised_loss(cfg, ctx)
        self.weight = float(cfg.args.get("weight", 1.0))
        self.ramp_steps = int(cfg.args.get("ramp_epochs", 1.0) * ctx.steps_per_epoch)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))   # a buffer: checkpointed, so resume is exact

    def training_step(self, batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        both = torch.cat([batch["image"], batch["image_two"]])             # (2B, 3, H, W)
        one, two = model(both)["logits"].float().chunk(2)                   # (B, C) each
        supervised = self.loss(one, batch["targets"], batch["observed"])
        consistency = (torch.sigmoid(one) - torch.sigmoid(two)).pow(2).mean()
        w = self.weight * ramp_up(int(self.step), self.ramp_steps)
        return {"loss": supervised + w * consistency, "supervised": supervised, "consistency": consistency}

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.step.fill_(step)
