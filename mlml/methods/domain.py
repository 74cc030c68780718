"""An adversarial domain branch: gradient reversal against the source of an image (DANN).

When labels are collected per group, or training and test images come from different sources,
a network can learn *where* an image came from instead of *what* it shows, and an assume-negative
loss rewards that shortcut. The branch removes source information from the backbone features
(Ganin & Lempitsky, ICML 2015):

    domain_loss = cross_entropy(head(reverse(features, lambda)), domain)       # (B, D) logits
    loss        = task loss + weight * domain_loss

`reverse` is the identity forward and multiplies the gradient by -lambda backward, so the head
learns to tell the domains apart while the backbone learns to make that impossible. lambda follows
`schedule` over training progress p = step / total steps:

    dann:      lambda(p) = lambda_max * (2 / (1 + exp(-gamma p)) - 1)        (gamma = 10)
    constant:  lambda(p) = lambda_max

With `start` = s > 0 the branch waits: lambda = 0 while p < s (the head learns, the backbone gets
nothing from it), then the schedule runs over the rest, dann at (p - s) / (1 - s): the task learns
first, undisturbed. Measured on the real scans' shortcut (README, "What the shortcut costs"), where
a branch acting from the first step kept the digits from taking off: with start = 0.5 they are
learned, and the adversarial head then breaks the model within two epochs of acting.

`weight` is relative to the task loss: with a sum-reduced loss (asl, hill, focal... reduce over the
B x C entries by default) the same weight is ~B*C times weaker; use `loss_args.reduction = "mean"`
with those (under AdamW the reduction alone hardly changes a run). The head learns at
`lr_scale` x optim.lr: a head slower than the backbone is fooled (its accuracy swings below chance,
the domain is encoded inverted rather than removed), a faster one keeps the game honest.

`kind = "mean"` replaces the adversarial game by a penalty with no head: the squared distance of each
domain's mean feature from the batch's mean (`mean_discrepancy`, a linear-kernel MMD as in Tzeng et
al., 2014), weighted by `weight` x lambda(p). A linear classifier on features whose domain means agree
gives every domain the same mean logits, so a shortcut that shifts the scores of one collection's
images has nothing left to read; unlike the adversarial head it cannot be fooled by features that
keep the domain while the head chases it (an adversarial head at chance accuracy does not show that
the domain is gone: a fresh probe may still read it).

`kind = "wasserstein"` is the same without a head but matches whole distributions, not means: per
input dimension, the squared 1-D Wasserstein-2 distance between each domain's values and the batch's
(`quantile_discrepancy`: sorted values against the batch's quantiles), which is at least the mean
penalty. On the scores it asks each collection for the same distribution of every label's predicted
probability (the same share of confident positives, not only the same mean score).

`input = "scores"` gives the branch the model's predicted probabilities sigmoid(logits) (C per image)
instead of the backbone features: the output-space alignment of Tsai et al. (CVPR 2018). When the
labels do not depend on the collection (per-group collections drawn at random), a model without the
shortcut predicts the same distribution of scores in every collection, while the shortcut ("this
collection's images have no objects") shows in the scores themselves; features may keep the style as
long as the predictions do not use it.

`kind = "conditional"` is CDAN (Long et al., NeurIPS 2018): the adversarial head reads the features
conditioned on the predictions, the multilinear map T(f, g) = g f^T flattened, so that it can align the
joint distribution of features and labels instead of the features alone (a domain whose images differ
only in which labels they hold is not pushed onto the other). A multi-label model's prediction is C
two-class distributions, so g = (p, 1 - p) with p = sigmoid(logits) (2C per image; CDAN's softmax g for
one exclusive label set), detached as in CDAN (the predictions condition the head; only the features
are reversed). When D x 2C exceeds `map_dim` x 4 the map is CDAN's randomised one,
T(f, g) = (R_f f) * (R_g g) / sqrt(map_dim) with fixed Gaussian R_f (D, map_dim), R_g (2C, map_dim)
drawn once from a fixed seed (buffers: checkpoints carry them). `entropy = true` is CDAN+E: each
image's domain loss is weighted by w = 1 + exp(-H(g)), normalised to mean 1 over the batch, so that
confident predictions count more; H is the mean binary entropy over the C labels (in [0, ln 2]; CDAN's
entropy of one softmax would grow with C here). It applies to both adversarial kinds.

`lambda_max = 0` makes the branch a monitor: the head still learns (its accuracy is logged), the
backbone gets no gradient from it.

Under torch.distributed the head is outside DDP like any method parameter: `Method.sync_gradients`
averages its gradients over ranks. The schedule's step is set once per optimiser step by
`Method.after_optimizer_step`, whatever the number of micro-batches (`optim.accumulate`).

Configured per run as `method.domain_branch = {weight = 0.3, lr_scale = 10.0, hidden = 256, schedule = "dann"}`
or `{weight = 1.0, kind = "mean"}` or `{weight = 1.0, kind = "wasserstein", input = "scores"}` or `{weight = 0.3, lr_scale = 10.0, kind = "conditional", entropy = true}`
(an empty table, or weight 0, is off; settings: `DomainBranchSettings`). The branch lives in
`Method` (mlml/methods/base.py), which hands it the `features` of the student's forward over all
the method's views (each view's rows get the batch's domains), so every registered method takes it
without code of its own. Domains are the batch's `domain` key
(see mlml/data/observation.py: the collection of `per_group`, labelled vs unlabelled with
`labelled_fraction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlml.losses import entropy_from_logits
from mlml.settings import must, one_of


@dataclass
class DomainBranchSettings:
    """`method.domain_branch`: the adversarial domain branch's settings (module docstring)."""

    weight: float = 0.0         # weight of the domain loss; 0 = no branch
    hidden: int = 256           # hidden units of the domain head; 0 = a linear head
    schedule: str = "dann"      # dann | constant
    lambda_max: float = 1.0     # lambda at the end of the dann schedule, or the constant value
    gamma: float = 10.0         # steepness of the dann schedule
    start: float = 0.0          # share of training before the branch acts (lambda 0: the head learns, the backbone is left alone)
    lr_scale: float = 1.0       # the head's learning rate / optim.lr (a faster head keeps up with the backbone)
    kind: str = "adversarial"   # adversarial (a head on reversed features) | conditional (CDAN: on features x predictions)
                                # | mean (match the domains' mean inputs) | wasserstein (match their distributions per dimension)
    input: str = "features"     # features (the backbone's, D) | scores (the head's sigmoid outputs, C)
    entropy: bool = False       # CDAN+E: weight each image's domain loss by 1 + exp(-entropy of its predictions)
    map_dim: int = 1024         # conditional: the randomised multilinear map's size when D x 2C > 4 x map_dim

    def __post_init__(self) -> None:
        one_of(self.schedule, "schedule", ("dann", "constant"))
        one_of(self.kind, "kind", ("adversarial", "conditional", "mean", "wasserstein"))
        one_of(self.input, "input", ("features", "scores"))
        for name in ("weight", "hidden", "lambda_max", "lr_scale"):
            must(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        must(self.map_dim >= 1, "map_dim", ">= 1", self.map_dim)
        must(0.0 <= self.start < 1.0, "start", "in [0, 1)", self.start)
        must(not (self.kind == "conditional" and self.input == "scores"), "input",
             "'features' with kind = 'conditional' (CDAN conditions the features on the scores)", self.input)
        must(not (self.entropy and self.kind in PENALTIES), "entropy",
             f"false with kind = '{self.kind}' (it weights an adversarial head's loss)", self.entropy)

    @property
    def reads_scores(self) -> bool:
        """Whether the branch reads the predicted probabilities (as its input, to condition on, or to weight by)."""
        return self.input == "scores" or self.kind == "conditional" or self.entropy


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lam * grad, None


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """x unchanged forward; the gradient multiplied by -lam backward."""
    return _GradientReversal.apply(x, lam)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """2 / (1 + exp(-gamma p)) - 1 for progress p in [0, 1] (clamped): 0 at the start, -> 1."""
    p = min(max(progress, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class DomainBranch(nn.Module):
    """Domain head on reversed features, with its lambda schedule.

    Args:
        settings: `method.domain_branch`, resolved.
        feature_dim: D, the backbone's feature size.
        num_domains: number of domains (>= 2).
        total_steps: optimiser steps of the run (the schedule's p = step / total_steps).
        num_labels: C, the model's outputs (needed by kind "conditional" and by `entropy`).
    """

    def __init__(self, settings: DomainBranchSettings, feature_dim: int, num_domains: int, total_steps: int,
                 num_labels: int = 0) -> None:
        super().__init__()
        if num_domains < 2:
            raise ValueError("method.domain_branch needs at least two domains; this data has one "
                             "(use data.observation = 'per_group', or observation_args.labelled_fraction < 1)")
        if feature_dim <= 0:
            raise ValueError("method.domain_branch needs MethodContext.feature_dim (the trainer fills it)")
        self.settings, self.num_domains, self.total_steps = settings, num_domains, max(1, total_steps)
        if (settings.kind == "conditional" or settings.entropy) and num_labels <= 0:
            raise ValueError("method.domain_branch: kind 'conditional' and entropy need the number of labels")
        h, width = settings.hidden, feature_dim
        if settings.kind == "conditional":
            width = feature_dim * 2 * num_labels
            if width > 4 * settings.map_dim:                                   # CDAN's randomised multilinear map
                g = torch.Generator().manual_seed(0)
                self.register_buffer("r_f", torch.randn(feature_dim, settings.map_dim, generator=g))
                self.register_buffer("r_g", torch.randn(2 * num_labels, settings.map_dim, generator=g))
                width = settings.map_dim
        if settings.kind not in PENALTIES:
            self.head = (nn.Sequential(nn.Linear(width, h), nn.ReLU(inplace=True), nn.Linear(h, num_domains))
                         if h else nn.Linear(width, num_domains))
        # optimiser steps taken, set by Method.after_optimizer_step (once per step, whatever the micro-batches);
        # a buffer, so checkpoints carry it and resume is exact
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def lam(self) -> float:
        s = self.settings
        progress = float(self.step) / self.total_steps
        if progress < s.start:
            return 0.0
        if s.schedule == "constant":
            return float(s.lambda_max)
        return float(s.lambda_max) * dann_lambda((progress - s.start) / (1.0 - s.start), float(s.gamma))

    def forward(self, features: Tensor, domain: Tensor, scores: Tensor | None = None) -> dict[str, Tensor]:
        """features (N, D) and domain long (N,), with the predicted probabilities `scores` (N, C) for
        kind "conditional" and `entropy` -> {"loss": weighted domain loss, logged parts}."""
        lam, s = self.lam(), self.settings
        if s.kind in PENALTIES:
            gap = PENALTIES[s.kind](features, domain, self.num_domains)
            return {"loss": float(s.weight) * lam * gap, "domain_loss": gap.detach(),
                    "domain_lambda": torch.tensor(lam)}
        scores = scores.detach() if scores is not None else None               # they condition, never learn
        reversed_ = grad_reverse(features, lam)
        if s.kind == "conditional":
            reversed_ = self.multilinear(reversed_, scores)
        logits = self.head(reversed_).float()                                  # (N, num_domains)
        if s.entropy:
            per_image = F.cross_entropy(logits, domain, reduction="none")
            weights = entropy_weights(scores)
            loss = (weights * per_image).sum() / weights.sum()
        else:
            loss = F.cross_entropy(logits, domain)
        return {
            "loss": float(s.weight) * loss,
            "domain_loss": loss.detach(),
            "domain_acc": (logits.argmax(1) == domain).float().mean().detach(),
            "domain_lambda": torch.tensor(lam),
        }

    def multilinear(self, features: Tensor, scores: Tensor) -> Tensor:
        """CDAN's map of features (N, D) and g = (p, 1 - p) (N, 2C): g f^T flattened (N, 2C D), or the
        randomised (R_f f) * (R_g g) / sqrt(map_dim) (N, map_dim) when that is too large."""
        g = torch.cat([scores, 1 - scores], 1).to(features.dtype)
        if hasattr(self, "r_f"):
            r_f, r_g = self.r_f.to(features.dtype), self.r_g.to(features.dtype)
            return (features @ r_f) * (g @ r_g) / math.sqrt(r_f.shape[1])
        return (g.unsqueeze(2) * features.unsqueeze(1)).flatten(1)


def entropy_weights(scores: Tensor) -> Tensor:
    """CDAN+E's w = 1 + exp(-H) per image, H the mean binary entropy of its C probabilities (N,)."""
    h = entropy_from_logits(torch.logit(scores.float(), eps=1e-6)).mean(1)
    return 1 + torch.exp(-h)


def mean_discrepancy(features: Tensor, domain: Tensor, num_domains: int) -> Tensor:
    """sum_d (n_d / N) ||mean of features in domain d - mean of all features||^2 over the domains present.

    The squared maximum mean discrepancy with a linear kernel (Tzeng et al., 2014, "Deep domain
    confusion"), for any number of domains: 0 exactly when every domain of the batch has the same mean
    feature, so that a linear head on the features gives every domain the same mean logits.
    """
    onehot = F.one_hot(domain, num_domains).to(features.dtype)                 # (N, K)
    counts = onehot.sum(0)                                                     # (K,)
    means = onehot.t() @ features / counts.clamp_min(1).unsqueeze(1)           # (K, D)
    share = counts / len(features)
    return (share.unsqueeze(1) * (means - features.mean(0)) ** 2).sum()


def quantile_discrepancy(features: Tensor, domain: Tensor, num_domains: int) -> Tensor:
    """sum_d (n_d / N) sum_j W2^2(domain d's values of dimension j, the batch's), over the domains present.

    The squared 1-D Wasserstein-2 distance per dimension, between each domain's empirical distribution
    and the pooled one, in closed form by sorting: the mean over i of (x_d,(i) - Q(q_i))^2, x_d,(i) the
    i-th smallest of the domain's n_d values and Q(q_i) the batch's quantile at q_i = (i + 1/2) / n_d.
    0 exactly when every domain has the batch's distribution in every dimension; it is at least
    `mean_discrepancy` (a distribution's W2 to another is at least the distance of their means), so
    it also aligns the spread: on predicted probabilities, each collection keeps the same share of
    confident positives per label, not only the same mean score.
    """
    x = features.float()
    total = x.new_zeros(())
    for d in range(num_domains):
        rows = x[domain == d]
        n = len(rows)
        if n == 0:
            continue
        levels = (torch.arange(n, device=x.device, dtype=x.dtype) + 0.5) / n
        pooled = torch.quantile(x, levels, dim=0)                              # (n_d, D)
        own = rows.sort(dim=0).values                                          # (n_d, D)
        total = total + (n / len(x)) * ((own - pooled) ** 2).mean(0).sum()
    return total


# the kinds without a head: a penalty on the domains' inputs, weighted by weight x lambda(p)
PENALTIES = {"mean": mean_discrepancy, "wasserstein": quantile_discrepancy}
