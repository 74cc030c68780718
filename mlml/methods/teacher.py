"""An exponential-moving-average teacher that any method switches on by configuration.

    method.teacher = {weight = 1.0}            # any key turns it on; an empty table (the default) is off

With the teacher on, the student learns from two terms:

    loss = objective(student(weak), batch)                                 # the method's own term, labelled images only
         + w(t) * pseudo_objective(student(strong), batch, pseudo_labels(teacher(weak), batch))

The method's own term sees only the images of the batch with any observed label: a loss such as
assume-negative or entropy maximisation would otherwise treat every label of an unlabelled image
as negative or maximally uncertain. The pseudo-labels and the consistency term are two method
hooks (`Method.pseudo_labels`, `Method.pseudo_objective`, mlml/methods/base.py); the defaults are
the sigmoid ones below, grouped heads override them with per-group softmax pseudo-labels
(mlml/methods/grouped.py).

The teacher is an EMA of the student (Tarvainen & Valpola, 2017), updated after every optimiser
step with decay d_t = min(1 - 1 / (t + 1), decay), so early on it follows the student closely.
It is never trained by the optimiser (its parameters have requires_grad False and it runs under
`torch.no_grad()`), it is a submodule of the method so checkpoints carry it, and it is what
evaluation reports first (`val/`, `test/`); the student is reported as `val_student/`,
`test_student/` (`report = "student"` swaps them).

BatchNorm: the teacher always runs in eval mode, so its predictions use running statistics; those
running statistics (every floating-point buffer) are averaged with the same EMA as the weights,
and integer buffers (`num_batches_tracked`) are copied. The teacher therefore never sees a batch's
own statistics, and its outputs do not depend on what else is in the batch.

Sigmoid pseudo-labels (linear heads) come from the teacher's probabilities p on the weak view, per
label: positive where p >= `pos_threshold`, negative where p <= `neg_threshold`, nothing in
between. With `class_adaptive`, the thresholds of class c become the batch quantiles that keep the
expected share of positives: the top `prior_c` of the batch's scores (at least
`pos_threshold_min`) are positives and the lowest `1 - prior_c - neg_margin` are negatives, where
`prior_c` is estimated from the observed positives and the expected number of positives per image
`k` (see `class_prior`; class-distribution-aware pseudo-labelling in the spirit of CAP, Xie et
al., 2023). This uses only the teacher's ranking within a class, which single-positive training
keeps far better than its calibration. `targets = "hard"` uses 1/0, `"soft"` the teacher's p
itself. Observed labels are never overridden: pseudo-labels apply to unobserved entries only. The
consistency term is the configured loss (`method.loss`, `method.loss_args`, `method.pos_weight`) on
the strong view with the labels completed by the pseudo-labels, so both terms share its reduction.
The consistency weight ramps up as w(t) = weight * exp(-5 (1 - t / T_r)^2) over the first `rampup`
fraction of training (Laine & Aila, 2017).

Logged parts: `sup`, `pseudo`, `weight`, and pseudo-label diagnostics against the hidden full
labels (`pseudo_pos_count`, `pseudo_neg_count` per image; `pseudo_pos_precision`,
`pseudo_pos_recall`, `pseudo_neg_precision`, `pseudo_neg_recall` over unobserved entries), read
through `Method.diagnostic_truth` only, never for training.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from mlml.settings import must, one_of


@dataclass
class TeacherSettings:
    """`method.teacher`: the EMA teacher's settings (module docstring)."""

    decay: float = 0.99              # EMA decay after warm-up
    weight: float = 1.0              # consistency weight after ramp-up
    rampup: float = 0.3              # fraction of training over which the weight ramps up
    report: str = "teacher"          # which model tables report first: teacher | student
    # sigmoid pseudo-labels (linear heads)
    pos_threshold: float = 0.7       # teacher p at or above: pseudo-positive
    neg_threshold: float = 0.05      # teacher p at or below: pseudo-negative
    targets: str = "hard"            # hard | soft
    class_adaptive: bool = False     # per-class batch-quantile thresholds from the class prior
    k: float | None = None           # class-adaptive: expected positives per image (as for EPR)
    pos_threshold_min: float = 0.0   # class-adaptive: lowest positive threshold
    neg_margin: float = 0.1          # class-adaptive: share of scores between positives and negatives left out
    # per-group softmax pseudo-labels (grouped heads)
    threshold: float = 0.9           # teacher softmax confidence at or above: the argmax class is the target

    def __post_init__(self) -> None:
        must(0.0 <= self.decay <= 1.0, "decay", "in [0, 1]", self.decay)
        must(self.weight >= 0.0, "weight", ">= 0", self.weight)
        must(0.0 <= self.rampup <= 1.0, "rampup", "in [0, 1]", self.rampup)
        one_of(self.report, "report", ("teacher", "student"))
        one_of(self.targets, "targets", ("hard", "soft"))
        for name in ("pos_threshold", "neg_threshold", "pos_threshold_min", "neg_margin", "threshold"):
            must(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]", getattr(self, name))
        must(not self.class_adaptive or (self.k is not None and self.k > 0), "k",
             "set (> 0, the expected number of positives per image) with class_adaptive = true", self.k)


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


def class_prior(observed_positives: Tensor, k: float) -> Tensor:
    """(C,) estimated share of images positive for each class: k * n_c / sum(n).

    Under single-positive labels the observed positive of an image is one of its positives chosen
    uniformly, so observed counts n_c are proportional to the true class frequencies up to a
    per-image factor; scaling by the expected number of positives per image k (as EPR assumes
    known) gives the prior.
    """
    n = observed_positives.double()
    if n.sum() <= 0:
        raise ValueError("method.teacher.class_adaptive needs observed positives in the training split")
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


class Teacher(nn.Module):
    """A frozen EMA copy of the student, its consistency weight, and the sigmoid pseudo-labels.

    `Method` holds one as `self.teacher` when `method.teacher` is set: a submodule, so checkpoints
    carry it, without trainable parameters, so the optimiser never sees it. It always runs in eval
    mode (running BatchNorm statistics, themselves EMA-averaged).

    Args:
        settings: `method.teacher`, resolved.
        student: the unwrapped student (`MethodContext.student`), copied once.
        total_steps: optimiser steps of the run (the ramp-up lasts `rampup` of them).
        positives: (C,) observed positives per label (the class prior of `class_adaptive`).
        loss: the consistency loss `fn(logits, targets, observed)` (the configured `method.loss`).
    """

    #: the view the student's consistency term sees, added to the method's views
    views = {"image_strong": "strong"}

    def __init__(self, settings: TeacherSettings, student: nn.Module | None, total_steps: int, positives: Tensor,
                 loss: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        if student is None:
            raise ValueError("method.teacher needs MethodContext.student (the trainer fills it)")
        self.settings, self.loss = settings, loss
        self.model = copy.deepcopy(student).eval()
        self.model.requires_grad_(False)
        self.rampup_steps = round(settings.rampup * total_steps)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("prior", class_prior(positives, settings.k) if settings.class_adaptive else torch.zeros(0))

    def train(self, mode: bool = True) -> "Teacher":
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.model(image)

    def update(self, student: nn.Module) -> None:
        """One EMA step towards the student (after each optimiser step)."""
        ema_update(self.model, student, ema_decay(int(self.updates), self.settings.decay))
        self.updates += 1

    def weight(self) -> float:
        """The consistency weight at the current step."""
        if self.rampup_steps == 0:
            return self.settings.weight
        return self.settings.weight * sigmoid_rampup(float(self.updates) / self.rampup_steps)

    def eval_models(self, models: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The method's models with the teacher first (`report = "teacher"`) or last."""
        if self.settings.report == "teacher":
            return {"teacher": self.model, **models}
        return {**models, "teacher": self.model}

    def thresholds(self, probs: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """Positive and negative thresholds, scalars or (C,) class-adaptive ones for `probs` (B, C)."""
        s = self.settings
        if not s.class_adaptive:
            return s.pos_threshold, s.neg_threshold
        return adaptive_thresholds(probs, self.prior, s.pos_threshold_min, s.neg_margin)

    def sigmoid_pseudo_labels(self, probs: Tensor, observed: Tensor) -> tuple[Tensor, Tensor]:
        """(targets float (B, C), mask bool (B, C)) from teacher probabilities `probs` (B, C)."""
        pos_t, neg_t = self.thresholds(probs)
        return pseudo_labels(probs, observed, pos_t, neg_t, soft=self.settings.targets == "soft")
