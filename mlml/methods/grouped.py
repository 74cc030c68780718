"""The grouped method for a grouped head (`model.head = "grouped"`).

`grouped`: loss = sum over exclusive groups of `group_cross_entropy` on the batch's `group_targets`
(observed class; unknown where the group is known not to apply; unobserved masked), plus the
configured sigmoid loss (`method.loss`, e.g. `an`) on the labels of non-exclusive groups if there
are any. Parts logged: `ce/<group>`, `sigmoid`.

With the teacher on (`method.teacher = {...}`, mlml/methods/teacher.py; formerly the method
`grouped_teacher`, now a config error naming this spelling), the unobserved (image, group) pairs
get pseudo-labels: where the teacher's group softmax on the weak view reaches `threshold`, its
argmax class (unknown included) is the target of the student's cross-entropy on the strong view,
weighted by the ramped-up `weight`. Logged per
group: `pseudo_rate/<g>` (share of unobserved pairs pseudo-labelled) and `pseudo_acc/<g>` (their
accuracy against the hidden full labels, diagnostics only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlml.config import MethodConfig
from mlml.groups import GroupTargets, group_cross_entropy, group_targets, pseudo_group_targets
from mlml.losses import get_loss
from mlml.methods.base import Method, MethodContext, register_method
from mlml.settings import NoSettings


@register_method("grouped")
class Grouped(Method):
    """Cross-entropy per exclusive group (+ the sigmoid loss on non-exclusive ones); no `method.args`."""

    Settings = NoSettings
    requires = ("model.head=grouped",)

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.pos_weight != "none":
            raise ValueError(f"method '{cfg.name}' takes no method.pos_weight; set it to 'none'")
        space = ctx.label_space
        sigmoid = [i for g in space.groups if not g.exclusive for i in g.labels]
        self.register_buffer("sigmoid_labels", torch.tensor(sigmoid, dtype=torch.long), persistent=False)
        self.loss = get_loss(cfg.loss, **cfg.loss_args) if sigmoid else None

    def objective(self, outputs: dict[str, dict], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"loss", "ce/<group>"..., ["sigmoid"]} of the student's outputs on the observed labels."""
        out = outputs["image"]
        if "group_logits" not in out:
            raise ValueError(f"method '{self.cfg.name}' needs a head with group_logits: set model.head = 'grouped'")
        targets, observed = batch["targets"], batch["observed"]
        known = group_targets(targets, observed, self.ctx.label_space)
        ce = group_cross_entropy(out["group_logits"], known)
        parts = {f"ce/{name}": v for name, v in ce.items()}
        loss = sum(ce.values(), torch.zeros((), device=targets.device))
        if self.loss is not None:
            idx = self.sigmoid_labels
            parts["sigmoid"] = self.loss(out["logits"].float()[:, idx], targets[:, idx], observed[:, idx])
            loss = loss + parts["sigmoid"]
        return {"loss": loss, **parts}

    def pseudo_labels(self, teacher_outputs: dict, batch: dict[str, Tensor]) -> tuple[dict, dict]:
        """Per exclusive group: (the teacher's confident classes on unobserved pairs, the observed ones)."""
        if "group_logits" not in teacher_outputs:
            raise ValueError(f"method '{self.cfg.name}' needs a head with group_logits: set model.head = 'grouped'")
        known = group_targets(batch["targets"], batch["observed"], self.ctx.label_space)
        pseudo = pseudo_group_targets(teacher_outputs["group_logits"], known, self.teacher.settings.threshold)
        return {g: GroupTargets(p.cls, p.mask & ~known[g].mask) for g, p in pseudo.items()}, known

    def pseudo_objective(self, outputs: dict, batch: dict[str, Tensor], pseudo: tuple[dict, dict]) -> dict[str, Tensor]:
        """Cross-entropy of the strong view on the pseudo-labelled pairs, and per-group diagnostics."""
        only_pseudo, known = pseudo
        cons = sum(group_cross_entropy(outputs["group_logits"], only_pseudo).values(),
                   torch.zeros((), device=outputs["logits"].device))
        parts = {"loss": cons}
        hidden = self.diagnostic_truth(batch["index"])
        truth = group_targets(hidden.float(), torch.ones_like(hidden), self.ctx.label_space) if hidden is not None else None
        for g, p in only_pseudo.items():
            unobserved = ~known[g].mask
            if unobserved.any():
                parts[f"pseudo_rate/{g}"] = p.mask[unobserved].float().mean()
            if truth is not None and p.mask.any():
                parts[f"pseudo_acc/{g}"] = (p.cls == truth[g].cls)[p.mask].float().mean()
        return parts
