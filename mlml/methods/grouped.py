"""The grouped method: per-group cross-entropy for a grouped head (`model.head = "grouped"`).

loss = sum over exclusive groups of `group_cross_entropy` on the `group_targets` of the batch
(observed class, unknown where the group is known not to apply, unobserved masked), plus the
configured sigmoid loss (`method.loss`, e.g. `an`) on the labels of the non-exclusive groups,
if there are any. The parts are logged as `ce/<group>` and `sigmoid`.
"""

from __future__ import annotations

import torch
from torch import nn

from mlml.config import MethodConfig
from mlml.groups import group_cross_entropy, group_targets
from mlml.losses import get_loss
from mlml.methods.base import Method, MethodContext, register_method


@register_method("grouped")
class Grouped(Method):
    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.pos_weight != "none":
            raise ValueError("method 'grouped' takes no method.pos_weight; set it to 'none'")
        space = ctx.label_space
        sigmoid = [i for g in space.groups if not g.exclusive for i in g.labels]
        self.register_buffer("sigmoid_labels", torch.tensor(sigmoid, dtype=torch.long), persistent=False)
        self.loss = get_loss(cfg.loss, **cfg.loss_args) if sigmoid else None

    def training_step(self, batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        out = model(batch["image"])
        if "group_logits" not in out:
            raise ValueError("method 'grouped' needs a head with group_logits: set model.head = 'grouped'")
        targets, observed = batch["targets"], batch["observed"]
        ce = group_cross_entropy(out["group_logits"], group_targets(targets, observed, self.ctx.label_space))
        parts = {f"ce/{name}": v for name, v in ce.items()}
        loss = sum(ce.values(), torch.zeros((), device=targets.device))
        if self.loss is not None:
            idx = self.sigmoid_labels
            parts["sigmoid"] = self.loss(out["logits"].float()[:, idx], targets[:, idx], observed[:, idx])
            loss = loss + parts["sigmoid"]
        return {"loss": loss, **parts}
