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
itself. Observed labels are never overridden: pseudo-labels apply to unobserved entries only, of
every image in the batch: the unlabelled images and the unobserved labels of the labelled ones
(`labelled_images = false`: unlabelled images only). The consistency term is the configured loss
(`method.loss`, `method.loss_args`, `method.pos_weight`) on the strong view (`view = "weak"`: the
method's own weak view, no strong one) with the labels completed by the pseudo-labels, so both
terms share its reduction. The consistency weight ramps up as w(t) = weight * exp(-5 (1 - t / T_r)^2)
over the first `rampup` fraction of training (Laine & Aila, 2017).

Options added against pseudo-labels that degrade during training (every one off by default, so
earlier configurations train bit-identically; docs/references.md has the papers):
- `cap = true`: CAP (Xie et al., NeurIPS 2023) as published, with the pool standing in for the
  paper's pass over the unlabelled set: per class, the `pos_share * prior_c` highest of the
  teacher's most recent `pool` scores (the batch's unlabelled images; all its images when it has
  none) set the positive threshold, the `neg_share * (1 - prior_c)` lowest the negative one
  (`cap_thresholds`). The paper relabels the whole unlabelled set once per epoch with the EMA
  model; the pool (a ring buffer, in checkpoints) holds the scores of the last pool / (unlabelled
  images per step) steps' teachers, so it must stay small while the teacher moves fast: in a
  tiny check (quick data, 10% labelled, step 46), a pool of 1472 rows (all 46 steps) gave 6.7
  pseudo-positives per unlabelled image where the prior asks for 3.4, thresholds over the batch
  alone 3.2. Hence 512 rows by default (8 steps of the quick profile's 64 unlabelled images).
- `prior`: the class distribution of `class_adaptive`, `cap` and `align`. `"observed"` is CAP's
  estimator, the share of positives among each class's observed labels (`observed_prior`; for
  fully labelled images, their positive frequency); it needs observed negatives, so under
  single-positive labels, where no labelled image shows a negative, it is an error and `"k"`
  is the fallback: k * (observed positives of c) / (all observed positives) (`class_prior`).
- `align = true`: distribution alignment (ReMixMatch) per class: the teacher's logit of class c
  shifts by logit(prior_c) - logit(mean of the pool's p_c) before thresholds and soft targets
  (`align_distribution`).
- `pool_scope = "unobserved"`: the pool of `cap` and `align` holds, per class, the scores of the
  entries that class's pseudo-labels are for: its unobserved entries, of every image of the batch
  (the rows with their observed mask; `cap_thresholds` and the marginal count only the unobserved
  ones). CAP's pool is the unlabelled images, which are the entries to pseudo-label when whole
  images are unlabelled; when labels are missing per group (per-group collections), a class's
  unobserved entries are the images of the collections that did not label it, and keeping the
  class distribution there, not over every image, is meant to stop a collection's low scores (the
  shortcut "this collection's images have none of these labels") from becoming its pseudo-negatives.
  On the real-scan shortcut it measured the same as CAP's pool (README, "At width 32, on top of
  masked BCE"). The default, `"images"`, is CAP's.
- `consistency = "bce_all"`: the consistency term is BCE on the pseudo-labelled entries alone,
  divided by all B * C entries (FixMatch's normalisation, `bce_over_all_entries`), instead of the
  configured loss on the completed labels. With every image single-positive, a method whose own
  term averages over all B * C entries (ROLE, EM, AN) otherwise meets a masked-BCE consistency term
  whose mean over the few kept entries weighs each of them ~C / (kept per image) times more, and
  whose observed positives, counted a second time, override the method's own balance.
- `warmup`: the first `warmup` fraction of training has no pseudo term (weight 0) and the teacher
  copies the student; the ramp-up and the EMA's own warm-up start when it ends. `rampup_decay`:
  the EMA decay while the weight ramps up (Mean Teacher used 0.99 then 0.999).

Logged parts: `sup`, `pseudo`, `weight`, and pseudo-label diagnostics against the hidden full
labels (`pseudo_pos_count`, `pseudo_neg_count` per image; `pseudo_pos_precision`,
`pseudo_pos_recall`, `pseudo_neg_precision`, `pseudo_neg_recall` over unobserved entries), read
through `Method.diagnostic_truth` only, never for training.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor, nn

from mlml.distributed import all_gather_cat
from mlml.losses import masked_bce
from mlml.settings import must, one_of

if TYPE_CHECKING:
    from mlml.methods.base import MethodContext


@dataclass
class TeacherSettings:
    """`method.teacher`: the EMA teacher's settings (module docstring). Every option added after the
    first tables defaults to off, so configurations written before it train bit-identically."""

    decay: float = 0.99              # EMA decay after warm-up
    weight: float = 1.0              # consistency weight after ramp-up
    rampup: float = 0.3              # fraction of training over which the weight ramps up
    report: str = "teacher"          # which model tables report first: teacher | student
    warmup: float = 0.0              # fraction of training before pseudo-labels count (weight 0, teacher = student)
    rampup_decay: float | None = None  # EMA decay while the weight ramps up (Mean Teacher: 0.99, then decay 0.999)
    view: str = "strong"             # the student's view in the consistency term: strong | weak
    # sigmoid pseudo-labels (linear heads)
    pos_threshold: float = 0.7       # teacher p at or above: pseudo-positive
    neg_threshold: float = 0.05      # teacher p at or below: pseudo-negative
    targets: str = "hard"            # hard | soft
    labelled_images: bool = True     # pseudo-label the unobserved entries of labelled images too (False: unlabelled only)
    prior: str = "k"                 # class prior of class_adaptive / cap / align: k | observed
    class_adaptive: bool = False     # per-class batch-quantile thresholds from the class prior
    k: float | None = None           # prior "k": expected positives per image (as for EPR)
    pos_threshold_min: float = 0.0   # class-adaptive: lowest positive threshold
    neg_margin: float = 0.1          # class-adaptive: share of scores between positives and negatives left out
    cap: bool = False                # CAP: per-class quantiles of the teacher's recent scores at the class prior
    pos_share: float = 1.0           # cap: share of the prior's positives that become pseudo-positives
    neg_share: float = 1.0           # cap: share of the prior's negatives that become pseudo-negatives
    pool: int = 512                  # cap / align: the teacher's score rows kept (oldest out first)
    align: bool = False              # distribution alignment of the teacher's p to the class prior (ReMixMatch)
    pool_scope: str = "images"       # cap / align: the pool holds the unlabelled images (images) | each class's unobserved entries (unobserved)
    consistency: str = "loss"        # the consistency term: loss (the configured method.loss) | bce_all (FixMatch's)
    # per-group softmax pseudo-labels (grouped heads)
    threshold: float = 0.9           # teacher softmax confidence at or above: the argmax class is the target

    def __post_init__(self) -> None:
        must(0.0 <= self.decay <= 1.0, "decay", "in [0, 1]", self.decay)
        must(self.weight >= 0.0, "weight", ">= 0", self.weight)
        must(0.0 <= self.rampup <= 1.0, "rampup", "in [0, 1]", self.rampup)
        one_of(self.report, "report", ("teacher", "student"))
        must(0.0 <= self.warmup < 1.0, "warmup", "in [0, 1)", self.warmup)
        must(self.rampup_decay is None or 0.0 <= self.rampup_decay <= 1.0, "rampup_decay", "in [0, 1]", self.rampup_decay)
        one_of(self.view, "view", ("strong", "weak"))
        one_of(self.targets, "targets", ("hard", "soft"))
        one_of(self.prior, "prior", ("k", "observed"))
        one_of(self.consistency, "consistency", ("loss", "bce_all"))
        one_of(self.pool_scope, "pool_scope", ("images", "unobserved"))
        must(self.pool_scope == "images" or self.uses_pool, "pool_scope",
             "'images' unless cap or align is on (only they keep a pool)", self.pool_scope)
        for name in ("pos_threshold", "neg_threshold", "pos_threshold_min", "neg_margin", "threshold",
                     "pos_share", "neg_share"):
            must(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]", getattr(self, name))
        must(self.pool >= 1, "pool", ">= 1", self.pool)
        must(not (self.cap and self.class_adaptive), "cap", "false with class_adaptive = true (two threshold rules)",
             self.cap)
        must(not self.uses_prior or self.prior != "k" or (self.k is not None and self.k > 0), "k",
             "set (> 0, the expected number of positives per image) with prior = 'k' and cap, align or "
             "class_adaptive on (or prior = 'observed' where labelled images have observed negatives)", self.k)

    @property
    def uses_prior(self) -> bool:
        return self.class_adaptive or self.cap or self.align

    @property
    def uses_pool(self) -> bool:
        return self.cap or self.align


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


def bce_over_all_entries(logits: Tensor, targets: Tensor, kept: Tensor) -> Tensor:
    """BCE on the `kept` entries summed and divided by all B * C entries: FixMatch's normalisation,
    where an entry without a confident pseudo-label counts as 0 (`consistency = "bce_all"`, on the
    pseudo-labelled entries only). A kept entry then weighs 1 / (B C), as in a full-label BCE,
    however few are kept; masked BCE's mean over the kept entries alone weighs each by 1 / #kept."""
    return masked_bce(logits, targets, kept) * (kept.sum() / kept.numel())


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
    known) gives the prior. This is mlml's fallback for CAP's estimate where labelled images carry
    one positive only (`prior = "k"`).
    """
    n = observed_positives.double()
    if n.sum() <= 0:
        raise ValueError("method.teacher: the class prior needs observed positives in the training split")
    return (k * n / n.sum()).clamp(0.0, 1.0).float()


def observed_prior(train_labels: Callable[[np.ndarray], tuple[Tensor, Tensor]], num_train: int,
                   chunk: int = 65536) -> Tensor:
    """(C,) share of positives among each class's observed entries over the training split.

    With fully labelled images (and the rest unlabelled) this is CAP's estimate of the class
    distribution, the positive frequency of each class on the labelled images (Xie et al., 2023,
    `pos_label_freq` in the reference code). It needs observed negatives: under single-positive
    labels every observed entry is positive and the estimate would be 1 (use `prior = "k"`).
    """
    pos = obs = None
    for start in range(0, num_train, chunk):
        targets, observed = train_labels(np.arange(start, min(start + chunk, num_train)))
        observed = observed.bool()
        p, o = ((targets > 0.5) & observed).sum(0).double(), observed.sum(0).double()
        pos, obs = (p, o) if pos is None else (pos + p, obs + o)
    if pos is None or bool((obs == 0).any()) or bool((obs == pos).all()):
        raise ValueError("method.teacher.prior = 'observed' needs every class observed and some observed negatives "
                         "(fully or partially labelled images); with single-positive labels use prior = 'k' and "
                         "method.teacher.k, the expected number of positives per image")
    return (pos / obs).float()


def cap_thresholds(scores: Tensor, prior: Tensor, pos_share: float, neg_share: float,
                   valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CAP's class-distribution-aware thresholds (Xie et al., NeurIPS 2023) over scores (n, C).

    Per class c, the `floor(pos_share * prior_c * n)` highest scores become positives and the
    `floor(neg_share * (1 - prior_c) * n)` lowest negatives, so that with shares 1 the pseudo-labels
    keep the class distribution `prior` and cover every entry. Returns (C,) positive and negative
    thresholds for `pseudo_labels` (p >= pos: positive, p <= neg: negative); a class whose count
    is 0 gets +inf / -inf (none), where the reference code's index -1 would take every score.
    `valid` (n, C) bool: per class, only its valid entries count (n becomes n_c, their number).
    """
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    n = valid.sum(0)                                                                            # (C,)
    counts = lambda share: torch.minimum(torch.floor(share * n + 1e-9).long(), n)             # (C,)
    n_pos, n_neg = counts(pos_share * prior.double()), counts(neg_share * (1.0 - prior.double()))
    inf = torch.full_like(scores[0], math.inf)
    desc = torch.where(valid, scores, -inf).sort(dim=0, descending=True).values              # invalid ones last
    asc = torch.where(valid, scores, inf).sort(dim=0).values
    pick = lambda ordered, m: ordered.gather(0, (m - 1).clamp(min=0)[None, :])[0]              # (C,)
    pos = torch.where(n_pos > 0, pick(desc, n_pos), inf)
    neg = torch.where(n_neg > 0, pick(asc, n_neg), -inf)
    return pos, neg


def align_distribution(probs: Tensor, prior: Tensor, marginal: Tensor, eps: float = 1e-4) -> Tensor:
    """Distribution alignment (Berthelot et al., ReMixMatch, ICLR 2020) of sigmoid outputs (B, C).

    ReMixMatch scales a softmax prediction by (labelled class marginal) / (running mean of the
    predictions) and renormalises. Each sigmoid output is a two-class distribution (p, 1 - p), so
    per class c the same rule reads p' = p r / (p r + (1 - p) s) with r = prior_c / marginal_c and
    s = (1 - prior_c) / (1 - marginal_c): a shift of the logit by logit(prior_c) - logit(marginal_c),
    which moves the mean prediction of each class towards its prior (both clamped to [eps, 1 - eps]).
    """
    shift = torch.logit(prior.clamp(eps, 1 - eps)) - torch.logit(marginal.clamp(eps, 1 - eps))     # (C,)
    return torch.sigmoid(torch.logit(probs.clamp(eps, 1 - eps)) + shift)


def pool_marginal(pool: Tensor, valid: Tensor | None, prior: Tensor) -> Tensor:
    """(C,) the mean teacher score per class over the pool (n, C), or over each class's `valid` entries
    (a class with none gets its prior: no shift in `align_distribution`)."""
    if valid is None:
        return pool.mean(0)
    n = valid.sum(0)
    return torch.where(n > 0, (pool * valid).sum(0) / n.clamp_min(1), prior.to(pool))


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


def teacher_views(settings: TeacherSettings) -> dict[str, str]:
    """The views the teacher adds to a method's (name -> augmentation): the student's strong view,
    or none with `view = "weak"` (the consistency term then reads the method's first view)."""
    return {"image_strong": "strong"} if settings.view == "strong" else {}


class Teacher(nn.Module):
    """A frozen EMA copy of the student, its consistency weight, and the sigmoid pseudo-labels.

    `Method` holds one as `self.teacher` when `method.teacher` is set: a submodule, so checkpoints
    carry it, without trainable parameters, so the optimiser never sees it. It always runs in eval
    mode (running BatchNorm statistics, themselves EMA-averaged).

    Args:
        settings: `method.teacher`, resolved.
        ctx: the run's `MethodContext` (the student to copy, steps, observed label counts and the
            training labels as observed, for the class prior).
        loss: the consistency loss `fn(logits, targets, observed)` (the configured `method.loss`).
    """

    def __init__(self, settings: TeacherSettings, ctx: MethodContext, loss: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        if ctx.student is None:
            raise ValueError("method.teacher needs MethodContext.student (the trainer fills it)")
        self.settings, self.loss = settings, loss
        self.model = copy.deepcopy(ctx.student).eval()
        self.model.requires_grad_(False)
        total_steps = ctx.epochs * ctx.steps_per_epoch
        self.warmup_steps = round(settings.warmup * total_steps)
        self.rampup_steps = round(settings.rampup * total_steps)
        #: the student's view in the consistency term (None: the method's first view)
        self.view = next(iter(teacher_views(settings)), None)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("prior", self._prior(ctx) if settings.uses_prior else torch.zeros(0))
        if settings.uses_pool:                      # registered only when used: default checkpoints keep their keys
            c = ctx.label_space.num_labels
            self.register_buffer("pool", torch.zeros(settings.pool, c))        # (P, C) recent teacher p, a ring
            self.register_buffer("pool_filled", torch.zeros((), dtype=torch.long))
            self.register_buffer("pool_next", torch.zeros((), dtype=torch.long))
            if settings.pool_scope == "unobserved":                            # (P, C) which entries count
                self.register_buffer("pool_valid", torch.zeros(settings.pool, c, dtype=torch.bool))

    def _prior(self, ctx: MethodContext) -> Tensor:
        """(C,) the class prior: from k and the observed positives, or CAP's observed-label estimate."""
        if self.settings.prior == "k":
            return class_prior(ctx.positives, self.settings.k)
        if ctx.train_labels is None:
            raise ValueError("method.teacher.prior = 'observed' needs MethodContext.train_labels (the trainer fills it)")
        return observed_prior(ctx.train_labels, ctx.num_train)

    def train(self, mode: bool = True) -> "Teacher":
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.model(image)

    def decay(self) -> float:
        """The EMA decay of the next update: 0 (a copy) during the warm-up, then the warm-up of
        `ema_decay` counted from its end, with `rampup_decay` while the weight ramps up."""
        t = int(self.updates) - self.warmup_steps
        if t < 0:
            return 0.0
        s = self.settings
        target = s.rampup_decay if s.rampup_decay is not None and t < self.rampup_steps else s.decay
        return ema_decay(t, target)

    def update(self, student: nn.Module) -> None:
        """One EMA step towards the student (after each optimiser step)."""
        ema_update(self.model, student, self.decay())
        self.updates += 1

    def weight(self) -> float:
        """The consistency weight at the current step: 0 during the warm-up, then ramped up."""
        t = int(self.updates) - self.warmup_steps
        if t < 0:
            return 0.0
        if self.rampup_steps == 0:
            return self.settings.weight
        return self.settings.weight * sigmoid_rampup(float(t) / self.rampup_steps)

    def consistency(self, logits: Tensor, batch: dict[str, Tensor], targets: Tensor, mask: Tensor) -> Tensor:
        """The consistency term of the student's `logits` (B, C) given the pseudo-labels (`targets`,
        `mask`): the configured loss on the labels completed by them (observed ones never
        overridden), or, with `consistency = "bce_all"`, BCE on the pseudo-labelled entries alone
        over all B * C (the observed ones are the method's own term's)."""
        if self.settings.consistency == "bce_all":
            return bce_over_all_entries(logits, targets, mask)
        observed = batch["observed"]
        return self.loss(logits, torch.where(observed, batch["targets"], targets), observed | mask)

    def eval_models(self, models: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The method's models with the teacher first (`report = "teacher"`) or last."""
        if self.settings.report == "teacher":
            return {"teacher": self.model, **models}
        return {**models, "teacher": self.model}

    @torch.no_grad()
    def remember(self, probs: Tensor, valid: Tensor | None = None) -> Tensor:
        """Add the rows `probs` (n, C) of every rank to the pool (with their `valid` (n, C) entries,
        `pool_scope = "unobserved"`); return the pool's filled rows (`pool_valid[:filled]` beside them)."""
        rows = all_gather_cat(probs.float())[-self.settings.pool:]            # identical on every rank
        size = self.pool.shape[0]
        where = (int(self.pool_next) + torch.arange(len(rows), device=rows.device)) % size
        self.pool[where] = rows.to(self.pool)
        if valid is not None:
            self.pool_valid[where] = all_gather_cat(valid)[-self.settings.pool:].to(self.pool_valid.device)
        self.pool_next.fill_((int(self.pool_next) + len(rows)) % size)
        self.pool_filled.fill_(min(size, int(self.pool_filled) + len(rows)))
        return self.pool[: int(self.pool_filled)]

    def thresholds(self, probs: Tensor, pool: Tensor | None = None, valid: Tensor | None = None
                   ) -> tuple[Tensor | float, Tensor | float]:
        """Positive and negative thresholds, scalars or (C,) class-wise ones: CAP's over the `pool`
        of recent scores (its `valid` entries), class-adaptive ones over the batch's `probs` (B, C)."""
        s = self.settings
        if s.cap:
            return cap_thresholds(pool, self.prior, s.pos_share, s.neg_share, valid)
        if not s.class_adaptive:
            return s.pos_threshold, s.neg_threshold
        return adaptive_thresholds(probs, self.prior, s.pos_threshold_min, s.neg_margin)

    def sigmoid_pseudo_labels(self, probs: Tensor, observed: Tensor) -> tuple[Tensor, Tensor]:
        """(targets float (B, C), mask bool (B, C)) from teacher probabilities `probs` (B, C).

        With the pool on, the teacher's scores of the batch's unlabelled images (all images when
        it has none; every image, its unobserved entries counted, with `pool_scope = "unobserved"`)
        enter it first; `align` then shifts `probs` and the pool towards the prior (the pool's mean
        is the running marginal), and `cap` thresholds at the pool's quantiles.
        """
        s, pool, valid = self.settings, None, None
        if s.uses_pool:
            if s.pool_scope == "unobserved":
                pool = self.remember(probs, ~observed)
                valid = self.pool_valid[: len(pool)]
            else:
                labelled = observed.any(1)                                     # (B,)
                pool = self.remember(probs[~labelled] if bool((~labelled).any()) else probs)
            if s.align:
                marginal = pool_marginal(pool, valid, self.prior)             # (C,)
                probs, pool = (align_distribution(x, self.prior, marginal) for x in (probs, pool))
        pos_t, neg_t = self.thresholds(probs, pool, valid)
        targets, mask = pseudo_labels(probs, observed, pos_t, neg_t, soft=s.targets == "soft")
        if not s.labelled_images:
            unlabelled = ~observed.any(1, keepdim=True)                        # (B, 1)
            mask = mask & unlabelled
            targets = targets * unlabelled
        return targets, mask
