"""`consistency`: the configured supervised loss plus agreement between two augmented views."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mlml.config import MethodConfig
from mlml.methods import Method, MethodContext
from mlml.methods.supervised import build_supervised_loss
from mlml.settings import must


def ramp_up(step: int, ramp_steps: int) -> float:
    """Sigmoid-shaped ramp from 0 to 1 over `ramp_steps` optimiser steps (Laine & Aila, 2017)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return 1.0
    return math.exp(-5.0 * (1.0 - step / ramp_steps) ** 2)


@dataclass
class ConsistencySettings:
    """`method.args` of `consistency`, checked when the config is loaded."""

    weight: float = 1.0        # weight of the consistency term after the ramp-up
    ramp_epochs: float = 1.0   # epochs over which it ramps up

    def __post_init__(self) -> None:
        must(self.weight >= 0, "weight", ">= 0", self.weight)
        must(self.ramp_epochs >= 0, "ramp_epochs", ">= 0", self.ramp_epochs)


class Consistency(Method):
    """`loss(view 1) + weight * ramp * mean((p(view 1) - p(view 2))^2)` over all labels.

    The consistency term uses every label, observed or not: it is where the unobserved ones get
    a training signal.
    """

    Settings = ConsistencySettings
    views = {"image": "weak", "image_two": "weak"}    # two independent draws of the weak augmentation

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)                      # resolves method.args into self.args
        self.loss = build_supervised_loss(cfg, ctx)     # method.loss, method.loss_args, method.pos_weight
        self.ramp_steps = int(self.args.ramp_epochs * ctx.steps_per_epoch)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))   # a buffer: checkpointed, so resume is exact

    def objective(self, outputs: dict[str, dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        one = outputs["image"]["logits"].float()                            # (B, C), one forward over both views
        two = outputs["image_two"]["logits"].float()                        # (B, C)
        supervised = self.loss(one, batch["targets"], batch["observed"])
        consistency = (torch.sigmoid(one) - torch.sigmoid(two)).pow(2).mean()
        w = self.args.weight * ramp_up(int(self.steps), self.ramp_steps)
        return {"loss": supervised + w * consistency, "supervised": supervised, "consistency": consistency}

    def on_step_end(self, model: torch.nn.Module, step: int) -> None:
        self.steps.fill_(step)
