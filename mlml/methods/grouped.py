"""Grouped methods for a grouped head (`model.head = "grouped"`).

`grouped`: loss = sum over exclusive groups of `group_cross_entropy` on the batch's `group_targets`
(observed class; unknown where the group is known not to apply; unobserved masked), plus the
configured sigmoid loss (`method.loss`, e.g. `an`) on the labels of non-exclusive groups if there
are any. Parts logged: `ce/<group>`, `sigmoid`.

`grouped_teacher`: the same, plus pseudo-labels for the unobserved (image, group) pairs from an
EMA teacher (the EMA and ramp-up of `mean_teacher`): where the teacher's group softmax on the weak
view reaches `threshold`, its argmax class (unknown included) is the target of the student's
cross-entropy on the strong view, weighted by a ramped-up `weight`.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from mlml.config import MethodConfig
from mlml.groups import GroupTargets, group_cross_entropy, group_targets, pseudo_group_targets
from mlml.losses import get_loss
from mlml.methods.base import Method, MethodContext, register_method
from mlml.methods.mean_teacher import EMATeacher


@register_method("grouped")
class Grouped(Method):
    requires = ("model.head=grouped",)

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.pos_weight != "none":
            raise ValueError(f"method '{cfg.name}' takes no method.pos_weight; set it to 'none'")
        space = ctx.label_space
        sigmoid = [i for g in space.groups if not g.exclusive for i in g.labels]
        self.register_buffer("sigmoid_labels", torch.tensor(sigmoid, dtype=torch.long), persistent=False)
        self.loss = get_loss(cfg.loss, **cfg.loss_args) if sigmoid else None

    def supervised(self, out: dict, batch: dict[str, Tensor], known: dict[str, GroupTargets]) -> dict[str, Tensor]:
        """{"loss", "ce/<group>"..., ["sigmoid"]} of model outputs `out` on the observed labels."""
        if "group_logits" not in out:
            raise ValueError(f"method '{self.cfg.name}' needs a head with group_logits: set model.head = 'grouped'")
        targets, observed = batch["targets"], batch["observed"]
        ce = group_cross_entropy(out["group_logits"], known)
        parts = {f"ce/{name}": v for name, v in ce.items()}
        loss = sum(ce.values(), torch.zeros((), device=targets.device))
        if self.loss is not None:
            idx = self.sigmoid_labels
            parts["sigmoid"] = self.loss(out["logits"].float()[:, idx], targets[:, idx], observed[:, idx])
            loss = loss + parts["sigmoid"]
        return {"loss": loss, **parts}

    def training_step(self, batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        known = group_targets(batch["targets"], batch["observed"], self.ctx.label_space)
        return self.supervised(model(batch["image"]), batch, known)


@register_method("grouped_teacher")
class GroupedTeacher(Grouped):
    """`grouped` + per-group pseudo-labels from an EMA teacher (module docstring).

    Args (method.args): decay 0.99 (EMA), threshold 0.9 (teacher softmax confidence), weight 1.0,
    rampup 0.3 (fraction of training), report "teacher" | "student" (reported first).
    Logged: `sup`, `pseudo`, `weight`, and per group `pseudo_rate/<g>` (share of unobserved pairs
    pseudo-labelled) and `pseudo_acc/<g>` (their accuracy against the hidden full labels,
    diagnostics only).
    """

    views = {"image": "weak", "image_strong": "strong"}
    DEFAULTS = {"decay": 0.99, "threshold": 0.9, "weight": 1.0, "rampup": 0.3, "report": "teacher"}

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        unknown = sorted(set(cfg.args) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"method 'grouped_teacher' has no argument '{unknown[0]}'; it takes: {', '.join(sorted(self.DEFAULTS))}")
        self.args = {**self.DEFAULTS, **cfg.args}
        a = self.args
        self.ema = EMATeacher(ctx.student, a["decay"], a["weight"], round(a["rampup"] * ctx.epochs * ctx.steps_per_epoch),
                              a["report"], "grouped_teacher")

    @property
    def teacher(self) -> nn.Module:
        return self.ema.model

    def training_step(self, batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        B, space = len(batch["image"]), self.ctx.label_space
        out = model(torch.cat([batch["image"], batch["image_strong"]]))            # one forward, (2B, ...)
        if "group_logits" not in out:
            raise ValueError("method 'grouped_teacher' needs a head with group_logits: set model.head = 'grouped'")
        weak = {"logits": out["logits"][:B], "group_logits": {g: z[:B] for g, z in out["group_logits"].items()}}
        strong = {g: z[B:] for g, z in out["group_logits"].items()}
        known = group_targets(batch["targets"], batch["observed"], space)
        parts = self.supervised(weak, batch, known)
        with torch.no_grad():
            teacher = self.ema(batch["image"])["group_logits"]                       # weak view
        pseudo = pseudo_group_targets(teacher, known, self.args["threshold"])
        only_pseudo = {g: GroupTargets(p.cls, p.mask & ~known[g].mask) for g, p in pseudo.items()}
        cons = sum(group_cross_entropy(strong, only_pseudo).values(), torch.zeros((), device=out["logits"].device))
        weight = self.ema.weight()
        sup = parts.pop("loss")
        parts.update(loss=sup + weight * cons, sup=sup.detach(), pseudo=cons.detach(), weight=torch.tensor(weight))
        hidden = self.diagnostic_truth(batch["index"])
        truth = group_targets(hidden.float(), torch.ones_like(hidden), space) if hidden is not None else None
        for g, p in only_pseudo.items():
            unobserved = ~known[g].mask
            if unobserved.any():
                parts[f"pseudo_rate/{g}"] = p.mask[unobserved].float().mean()
            if truth is not None and p.mask.any():
                parts[f"pseudo_acc/{g}"] = (p.cls == truth[g].cls)[p.mask].float().mean()
        return parts

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.ema.update(model)

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        return self.ema.eval_models(model)
