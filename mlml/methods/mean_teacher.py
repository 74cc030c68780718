"""Teacher-student pseudo-labelling under an exponential-moving-average teacher.

The student learns from two terms:

    loss = supervised(student(weak), targets, observed)               # labelled images of the batch
         + w(t) * supervised(student(strong), targets | pseudo, observed | pseudo-labelled)

`supervised` is any registered loss (`method.loss`): the pseudo-labels are handed to the same loss
as extra observed labels, so both terms share its reduction and its treatment of what stays
unobserved (a sum-reduced loss such as ASL would otherwise dwarf a mean-reduced BCE term).

The teacher is an EMA of the student (Tarvainen & Valpola, 2017), updated after every optimiser
step with decay d_t = min(1 - 1 / (t + 1), decay), so early on it follows the student closely.
It is never trained by the optimiser (its parameters have requires_grad False and it runs under
`torch.no_grad()`), it lives in this method so checkpoints carry it, and it is what evaluation
reports first (`val/`, `test/`); the student is reported as `val_student/`, `test_student/`
(`args.report = "student"` swaps them).

BatchNorm: the teacher always runs in eval mode, so its predictions use running statistics; those
running statistics (every floating-point buffer) are averaged with the same EMA as the weights,
and integer buffers (`num_batches_tracked`) are copied. The teacher therefore never sees a batch's
own statistics, and its outputs do not depend on what else is in the batch.

Pseudo-labels come from the teacher's probabilities p on the weak view, per label:
positive where p >= `pos_threshold`, negative where p <= `neg_threshold`, nothing in between.
With `class_adaptive`, the thresholds of class c become the batch quantiles that keep the expected
share of positives: the top `prior_c` of the batch's scores (at least `pos_threshold_min`) are
positives and the lowest `1 - prior_c - neg_margin` are negatives, where `prior_c` is estimated
from the observed positives and the expected number of positives per image `k` (see
`class_prior`; class-distribution-aware pseudo-labelling in the spirit of CAP, Xie et al., 2023).
This uses only the teacher's ranking within a class, which single-positive training keeps far
better than its calibration (an assume-negative teacher rarely gives an unobserved positive p > 0.5). `targets = "hard"` uses 1/0, `"soft"` the teacher's p itself. Observed labels
are never overridden: pseudo-labels apply to unobserved entries only. The consistency weight
ramps up as w(t) = weight * exp(-5 (1 - t / T_r)^2) over the first `rampup` fraction of training
(Laine & Aila, 2017).

Logged parts: `sup`, `pseudo`, `weight`, and pseudo-label diagnostics against the hidden full
labels (`pseudo_pos_count`, `pseudo_neg_count` per image; `pseudo_pos_precision`,
`pseudo_pos_recall`, `pseudo_neg_precision`, `pseudo_neg_recall` over unobserved entries). The
full labels are read for those diagnostics only, never for training. The supervised loss sees
the labelled images of the batch only (those with any observed label): a loss such as
assume-negative or entropy maximisation would otherwise treat every label of an unlabelled image
as negative or maximally uncertain.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from mlml.config import MethodConfig
from mlml.methods.base import Method, MethodContext, register_method
from mlml.methods.supervised import build_supervised_loss

DEFAULTS = {
    "decay": 0.99,              # EMA decay after warm-up
    "pos_threshold": 0.7,       # teacher p at or above: pseudo-positive
    "neg_threshold": 0.05,      # teacher p at or below: pseudo-negative
    "targets": "hard",          # hard | soft
    "weight": 1.0,              # consistency weight after ramp-up
    "rampup": 0.3,              # fraction of training over which the weight ramps up
    "class_adaptive": False,
    "k": None,                  # class-adaptive: expected positives per image (as for EPR)
    "pos_threshold_min": 0.0,   # class-adaptive: lowest positive threshold
    "neg_margin": 0.1,          # class-adaptive: share of scores between positives and negatives left out
    "report": "teacher",        # which model tables report first: teacher | student
}


def ema_decay(step: int, decay: float) -> float:
    """Decay applied at update number `step` (0-based): min(1 - 1 / (step + 1), decay)."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for parameters and float buffers."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.lerp_(s, 1.0 - decay)
        else:
            t.copy_(s)


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - progress)^2) for progress in [0, 1], 1 after (Laine & Aila, 2017)."""
    p = min(max(progress, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - p) ** 2)


def pseudo_labels(probs: Tensor, observed: Tensor, pos_threshold: Tensor | float, neg_threshold: Tensor | float,
                  soft: bool) -> tuple[Tensor, Tensor]:
    """Targets and mask of the pseudo-labels.

    Args:
        probs: float (B, C) teacher probabilities.
        observed: bool (B, C); observed entries never receive a pseudo-label.
        pos_threshold, neg_threshold: scalars or (C,) per-class thresholds.
        soft: targets are the probabilities themselves instead of 1 / 0.

    Returns:
        targets float (B, C) (0 outside the mask), mask bool (B, C).
    """
    positive = (probs >= pos_threshold) & ~observed
    negative = (probs <= neg_threshold) & ~observed & ~positive
    mask = positive | negative
    targets = probs if soft else positive.float()
    return torch.where(mask, targets, torch.zeros_like(probs)), mask


def adaptive_thresholds(probs: Tensor, prior: Tensor, pos_min: float, neg_margin: float) -> tuple[Tensor, Tensor]:
    """(C,) thresholds keeping the top `prior_c` of each class's batch scores positive and the
    lowest `1 - prior_c - neg_margin` negative."""
    q_pos = (1.0 - prior).clamp(0.0, 1.0)
    q_neg = (1.0 - prior - neg_margin).clamp(0.0, 1.0)
    sorted_p = probs.sort(dim=0).values                              # (B, C), ascending per class
    b = probs.shape[0]
    pick = lambda q: sorted_p.gather(0, (q * (b - 1)).round().long()[None, :])[0]
    return pick(q_pos).clamp(min=pos_min), pick(q_neg)


def class_prior(observed_positives: Tensor, k: float | None) -> Tensor:
    """(C,) estimated share of images positive for each class: k * n_c / sum(n).

    Under single-positive labels the observed positive of an image is one of its positives chosen
    uniformly, so observed counts n_c are proportional to the true class frequencies up to a
    per-image factor; scaling by the expected number of positives per image k (as EPR assumes
    known) gives the prior.
    """
    if k is None:
        raise ValueError("method.args.class_adaptive needs method.args.k, the expected number of positives per image")
    n = observed_positives.double()
    if n.sum() <= 0:
        raise ValueError("class-adaptive thresholds need observed positives in the training split")
    return (k * n / n.sum()).clamp(0.0, 1.0).float()


def pseudo_label_quality(pseudo: Tensor, mask: Tensor, full: Tensor, observed: Tensor) -> dict[str, Tensor]:
    """Precision and recall of hard pseudo-positives / negatives against the full labels (diagnostics)."""
    unobs = ~observed
    pos, neg = mask & (pseudo >= 0.5), mask & (pseudo < 0.5)
    true_pos, true_neg = (full > 0.5) & unobs, (full <= 0.5) & unobs
    out = {"pseudo_pos_count": pos.sum(1).float().mean(), "pseudo_neg_count": neg.sum(1).float().mean()}
    for name, chosen, truth in (("pos", pos, true_pos), ("neg", neg, true_neg)):
        if chosen.any():
            out[f"pseudo_{name}_precision"] = (chosen & truth).sum().float() / chosen.sum()
        if truth.any():
            out[f"pseudo_{name}_recall"] = (chosen & truth).sum().float() / truth.sum()
    return out


class EMATeacher(nn.Module):
    """A frozen EMA copy of the student, with its update count and the consistency ramp-up.

    Teacher-student methods hold one (`mean_teacher`, `grouped_teacher`): it is a submodule, so
    checkpoints carry it, and it has no trainable parameter, so the optimiser never sees it. It
    always runs in eval mode (running BatchNorm statistics, themselves EMA-averaged).

    Args:
        student: the unwrapped student (`MethodContext.student`), copied once.
        decay: EMA decay after warm-up; `weight`: consistency weight after ramp-up;
        rampup_steps: optimiser steps of the ramp-up (0: none); report: "teacher" or "student",
        the model evaluated first; method: the method's name, for error messages.
    """

    def __init__(self, student: nn.Module | None, decay: float, weight: float, rampup_steps: int, report: str, method: str) -> None:
        super().__init__()
        if student is None:
            raise ValueError(f"method '{method}' needs MethodContext.student (the trainer fills it)")
        if report not in ("teacher", "student"):
            raise ValueError(f"method.args.report must be 'teacher' or 'student', got '{report}'")
        self.model = copy.deepcopy(student).eval()
        self.model.requires_grad_(False)
        self.decay, self.max_weight, self.rampup_steps, self.report = decay, weight, rampup_steps, report
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.model(image)

    def update(self, student: nn.Module) -> None:
        """One EMA step towards the student (after each optimiser step)."""
        ema_update(self.model, student, ema_decay(int(self.updates), self.decay))
        self.updates += 1

    def weight(self) -> float:
        """The consistency weight at the current step."""
        if self.rampup_steps == 0:
            return self.max_weight
        return self.max_weight * sigmoid_rampup(float(self.updates) / self.rampup_steps)

    def eval_models(self, student: nn.Module) -> dict[str, nn.Module]:
        pair = {"teacher": self.model, "student": student}
        return pair if self.report == "teacher" else dict(reversed(list(pair.items())))


@register_method("mean_teacher")
class MeanTeacher(Method):
    """Supervised loss on observed labels + pseudo-labels from an EMA teacher on unobserved ones."""

    views = {"image": "weak", "image_strong": "strong"}

    def __init__(self, cfg: MethodConfig, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        unknown = sorted(set(cfg.args) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"method 'mean_teacher' has no argument '{unknown[0]}'; it takes: {', '.join(sorted(DEFAULTS))}")
        self.args = {**DEFAULTS, **cfg.args}
        if self.args["targets"] not in ("hard", "soft"):
            raise ValueError(f"method.args.targets must be 'hard' or 'soft', got '{self.args['targets']}'")
        self.supervised = build_supervised_loss(cfg, ctx)
        a = self.args
        self.ema = EMATeacher(ctx.student, a["decay"], a["weight"], round(a["rampup"] * ctx.epochs * ctx.steps_per_epoch),
                              a["report"], "mean_teacher")
        self.register_buffer("prior", class_prior(ctx.positives, a["k"]) if a["class_adaptive"] else torch.zeros(0))

    @property
    def teacher(self) -> nn.Module:
        return self.ema.model

    def training_step(self, batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        observed = batch["observed"]
        # One student forward over both views: (2B, C), BatchNorm statistics over both.
        weak, strong = model(torch.cat([batch["image"], batch["image_strong"]]))["logits"].float().chunk(2)
        labelled = observed.any(1)                                             # (B,) images with any label
        sup = self.supervised(weak[labelled], batch["targets"][labelled], observed[labelled]) if labelled.any() else weak.sum() * 0
        with torch.no_grad():
            probs = torch.sigmoid(self.ema(batch["image"])["logits"].float())     # (B, C) teacher, weak view
        pos_t, neg_t = self.thresholds(probs)
        pseudo, mask = pseudo_labels(probs, observed, pos_t, neg_t, soft=self.args["targets"] == "soft")
        # The configured loss on the strong view, its labels completed by the pseudo-labels.
        cons = self.supervised(strong, torch.where(observed, batch["targets"], pseudo), observed | mask)
        weight = self.ema.weight()
        parts = {"loss": sup + weight * cons, "sup": sup.detach(), "pseudo": cons.detach(),
                 "weight": torch.tensor(weight)}
        truth = self.diagnostic_truth(batch["index"])
        if truth is not None:
            parts.update(pseudo_label_quality(pseudo, mask, truth, observed))
        return parts

    def thresholds(self, probs: Tensor) -> tuple[Tensor | float, Tensor | float]:
        a = self.args
        if not a["class_adaptive"]:
            return a["pos_threshold"], a["neg_threshold"]
        return adaptive_thresholds(probs, self.prior, a["pos_threshold_min"], a["neg_margin"])

    def on_step_end(self, model: nn.Module, step: int) -> None:
        self.ema.update(model)

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        return self.ema.eval_models(model)
