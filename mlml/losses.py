"""Losses for multi-label learning with missing labels, as plain functions of logits.

Every loss has the signature `fn(logits, targets, observed, **hparams) -> scalar`:

- `logits`: float (B, C), raw scores x; p = sigmoid(x).
- `targets`: float (B, C) in {0, 1} or soft in [0, 1]; read only where `observed` is True.
- `observed`: bool (B, C), True where the label is known (an unlabelled image is all False).

All per-entry terms are written with `logsigmoid` / `softplus` forms (-log p = softplus(-x),
-log(1 - p) = softplus(x)), so values and gradients stay finite for |x| up to 100 in float32.
For hard targets each loss equals its published formula; soft targets enter linearly,
`y * loss_pos + (1 - y) * loss_neg`. The "assume negative" members read every unobserved entry
as a negative; observed negatives (absent in the single-positive setting) keep their label.

Reductions follow the reference code: the Cole et al. family (an, an_ls, wan, epr, em) sums
the (B, C) loss matrix and divides by B * C, regularisers added after; hill, splc and asl sum
(their `reduction="mean"` divides by B * C, for trainers that keep one learning rate across
losses). `get_loss(name, **hparams)` returns the callable with its hyperparameters bound.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mlml.registry import Registry

LossFn = Callable[..., Tensor]

LOSSES: Registry[LossFn] = Registry("loss", entry_point_group="mlml.losses")
register_loss = LOSSES.register

_REDUCTIONS = ("sum", "mean")


def get_loss(name: str | LossFn, **hparams) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The registered loss `name` with `hparams` bound (a `functools.partial`).

    Raises:
        KeyError: unknown loss name (the message lists the known ones).
        TypeError: a hyperparameter the loss does not take (the message names loss and key).
    """
    fn = LOSSES.get(name)
    params = list(inspect.signature(fn).parameters.values())
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    allowed = [p.name for p in params[3:] if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for key in hparams:
        if key not in allowed and not takes_any:
            label = name if isinstance(name, str) else getattr(fn, "__name__", repr(fn))
            raise TypeError(
                f"loss '{label}' has no hyperparameter '{key}'; "
                f"it takes: {', '.join(allowed) or '(none)'}"
            )
    return functools.partial(fn, **hparams)


# ---------------------------------------------------------------------------------------------
# Helpers (also used by the stateful methods: role, em_apl, ll_*)
# ---------------------------------------------------------------------------------------------


def assume_negative_targets(targets: Tensor, observed: Tensor) -> Tensor:
    """Observed targets where known, 0 elsewhere; never reads unobserved `targets`. (B, C)"""
    return torch.where(observed, targets, torch.zeros_like(targets))


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Elementwise binary entropy H(sigmoid(x)) in nats, from logits. Same shape as `logits`.

    H = softplus(-|x|) + |x| * sigmoid(-|x|) (equal to softplus(x) - x * sigmoid(x), but without
    cancellation); value and gradient are finite for any finite x.
    """
    a = logits.abs()
    return F.softplus(-a) + a * torch.sigmoid(-a)


def epr_regulariser(probs: Tensor, k: float) -> Tensor:
    """Expected-positive regulariser of Cole et al. (CVPR 2021), scaled as in their code.

    R = (mean_b sum_c probs[b, c] - k)^2 / C^2, with `probs` (B, C) in [0, 1] (pass
    `sigmoid(logits)`, or a table of label estimates as in ROLE) and k the expected number of
    positives per image.
    """
    num_classes = probs.shape[1]
    return (probs.sum(dim=1).mean() - k) ** 2 / num_classes**2


@torch.no_grad()
def large_loss_mask(per_entry_loss: Tensor, unobserved: Tensor, k: int) -> Tensor:
    """Bool (B, C) mask of the k largest `per_entry_loss` values among `unobserved` entries.

    For large-loss rejection / correction (Kim et al., CVPR 2022). k is clipped to the number of
    unobserved entries; ties at the k-th value are broken by `torch.topk`. (The reference code
    keeps entries strictly above the k-th value, i.e. one fewer; the caller may pass k - 1.)
    """
    k = max(0, min(int(k), int(unobserved.sum())))
    mask = torch.zeros_like(unobserved, dtype=torch.bool)
    if k == 0:
        return mask
    scores = per_entry_loss.masked_fill(~unobserved, -math.inf).flatten()
    mask.view(-1)[torch.topk(scores, k).indices] = True
    return mask


@torch.no_grad()
def estimate_pos_weight(
    targets: Tensor, observed: Tensor, assume_negative: bool = True, max_weight: float = 100.0
) -> Tensor:
    """Per-class positive weight (C,) = #negatives / #positives, for `bce`-style losses.

    Positives are observed targets (soft values count fractionally); negatives are observed
    negatives, plus every unobserved entry if `assume_negative`. The ratio is clipped to
    [1 / max_weight, max_weight]: a class with no positive gets `max_weight`, one with no
    negative `1 / max_weight`, one with neither 1.
    """
    y = assume_negative_targets(targets, observed)  # 0 where unobserved
    pos = y.sum(dim=0)
    neg = observed.sum(dim=0) - pos  # observed negatives (soft targets count 1 - y)
    if assume_negative:
        neg = neg + (~observed).sum(dim=0)
    ratio = neg / pos.clamp_min(torch.finfo(y.dtype).tiny)
    ratio = torch.where((pos == 0) & (neg == 0), torch.ones_like(ratio), ratio)
    return ratio.clamp(1.0 / max_weight, max_weight)


def _check(logits: Tensor, targets: Tensor, observed: Tensor) -> None:
    if logits.dim() != 2 or targets.shape != logits.shape or observed.shape != logits.shape:
        raise ValueError(
            "logits, targets and observed must all be (B, C); got "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}, {tuple(observed.shape)}"
        )
    if observed.dtype != torch.bool:
        raise ValueError(f"observed must be a bool mask, got dtype {observed.dtype}")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    """'sum' over all entries, or 'mean' = sum / (B * C)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}'; known: {', '.join(_REDUCTIONS)}")
    return loss.sum() if reduction == "sum" else loss.mean()


def _sigmoid_pow(z: Tensor, gamma: float) -> Tensor:
    """sigmoid(z) ** gamma as exp(gamma * logsigmoid(z)): finite gradient even where it is 0."""
    return torch.exp(gamma * F.logsigmoid(z))


def _bce(logits: Tensor, y: Tensor, pos_weight: Tensor | None = None, weight: Tensor | None = None,
         reduction: str = "none") -> Tensor:
    """BCE with logits, per entry (B, C) or reduced; `pos_weight` (C,) scales the positive term and
    `weight` (B, C) each entry (one fused op: cheaper than multiplying the per-entry losses after)."""
    if pos_weight is not None:
        pos_weight = pos_weight.to(logits)
    return F.binary_cross_entropy_with_logits(logits, y, weight=weight, pos_weight=pos_weight, reduction=reduction)


# ---------------------------------------------------------------------------------------------
# Full labels and masks
# ---------------------------------------------------------------------------------------------


@register_loss("bce")
def bce(
    logits: Tensor, targets: Tensor, observed: Tensor, pos_weight: Tensor | None = None
) -> Tensor:
    """Full-label BCE on every entry: the upper bound with complete labels.

    loss = mean_{b,c} -[w_c y log p + (1 - y) log(1 - p)], w = `pos_weight` (C,) or 1.
    Ignores `observed` and reads ALL targets, so it needs fully labelled data.
    Reduction: mean over B * C.
    """
    _check(logits, targets, observed)
    return _bce(logits, targets, pos_weight).mean()


@register_loss("masked_bce")
def masked_bce(
    logits: Tensor, targets: Tensor, observed: Tensor, pos_weight: Tensor | None = None
) -> Tensor:
    """BCE on observed entries only (partial labels, unobserved entries ignored).

    loss = sum_{observed} -[w_c y log p + (1 - y) log(1 - p)] / #observed, w = `pos_weight` or 1.
    Reduction: mean over observed entries; 0 (with a graph) when nothing is observed.
    """
    _check(logits, targets, observed)
    y = assume_negative_targets(targets, observed)
    return _bce(logits, y, pos_weight, weight=observed.to(logits.dtype), reduction="sum") / observed.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Cole et al., "Multi-label learning from single positive labels", CVPR 2021
# ---------------------------------------------------------------------------------------------


@register_loss("an")
def an(
    logits: Tensor, targets: Tensor, observed: Tensor, pos_weight: Tensor | None = None
) -> Tensor:
    """Assume negative (Cole et al., CVPR 2021): every unobserved label is a negative.

    pos: -w_c log p; observed neg and unobserved: -log(1 - p); w = `pos_weight` (C,) or 1.
    Reduction: mean over B * C.
    """
    _check(logits, targets, observed)
    return _bce(logits, assume_negative_targets(targets, observed), pos_weight).mean()


@register_loss("an_ls")
def an_ls(logits: Tensor, targets: Tensor, observed: Tensor, eps: float = 0.1) -> Tensor:
    """Assume negative with label smoothing (Cole et al., CVPR 2021).

    pos: (1-e)(-log p) + e(-log(1-p)); neg and unobserved: (1-e)(-log(1-p)) + e(-log p),
    i.e. BCE against y (1 - 2e) + e with y the assume-negative target. Default e = 0.1.
    Reduction: mean over B * C.
    """
    _check(logits, targets, observed)
    y = assume_negative_targets(targets, observed)
    return _bce(logits, y * (1 - 2 * eps) + eps).mean()


@register_loss("wan")
def wan(logits: Tensor, targets: Tensor, observed: Tensor, gamma: float | None = None) -> Tensor:
    """Weak assume negative (Cole et al., CVPR 2021): down-weighted negatives for unknowns.

    observed: BCE (pos -log p, neg -log(1-p)); unobserved: -g log(1 - p).
    Default g = 1 / (C - 1) (1 when C = 1). Reduction: mean over B * C.
    """
    _check(logits, targets, observed)
    if gamma is None:
        gamma = 1.0 / max(logits.shape[1] - 1, 1)
    weight = torch.where(observed, 1.0, gamma).to(logits.dtype)  # (B, C)
    return _bce(logits, assume_negative_targets(targets, observed), weight=weight, reduction="mean")


@register_loss("epr")
def epr(logits: Tensor, targets: Tensor, observed: Tensor, k: float = 1.5) -> Tensor:
    """Expected positive regularisation (Cole et al., CVPR 2021).

    observed: BCE (pos -log p, neg -log(1-p)); unobserved: 0; plus
    (mean_b sum_c p - k)^2 / C^2 (see `epr_regulariser`). k is the expected number of
    positives per image, dataset-specific: VOC 1.5 (the default), COCO 2.9, NUS 1.9, CUB 31.4.
    Reduction: mean over B * C of the entry losses, regulariser added after.
    """
    _check(logits, targets, observed)
    main = _bce(logits, assume_negative_targets(targets, observed), weight=observed.to(logits.dtype), reduction="mean")
    return main + epr_regulariser(torch.sigmoid(logits), k)


# ---------------------------------------------------------------------------------------------
# Zhou et al., "Acknowledging the unknown for multi-label learning with single positive
# labels", ECCV 2022
# ---------------------------------------------------------------------------------------------


@register_loss("em")
def em(logits: Tensor, targets: Tensor, observed: Tensor, alpha: float = 0.1) -> Tensor:
    """Entropy maximisation (Zhou et al., ECCV 2022).

    observed: BCE (pos -log p, neg -log(1-p)); unobserved: -a H(p), H the binary entropy
    (so minimising the loss maximises the entropy of unknown labels). Default a = 0.1
    (COCO, NUS; VOC 0.2, CUB 0.01). Reduction: mean over B * C.
    """
    _check(logits, targets, observed)
    per_entry = _bce(logits, assume_negative_targets(targets, observed))
    return torch.where(observed, per_entry, -alpha * entropy_from_logits(logits)).mean()


# ---------------------------------------------------------------------------------------------
# Zhang et al., "Simple and robust loss design for multi-label learning with missing labels",
# 2021 (Hill and SPLC)
# ---------------------------------------------------------------------------------------------


def _focal_pos(logits: Tensor, gamma: float) -> Tensor:
    """-(1 - p)^g log p, per entry."""
    return _sigmoid_pow(-logits, gamma) * F.softplus(-logits)


def _focal_neg(logits: Tensor, gamma: float) -> Tensor:
    """-p^g log(1 - p), per entry."""
    return _sigmoid_pow(logits, gamma) * F.softplus(logits)


@register_loss("hill")
def hill(
    logits: Tensor,
    targets: Tensor,
    observed: Tensor,
    lam: float = 1.5,
    margin: float = 1.0,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> Tensor:
    """Hill loss (Zhang et al., 2021): focal-margin positives, Hessian-shaped negatives.

    pos: -(1 - sigmoid(x - m))^g log sigmoid(x - m); observed neg and unobserved: (l - p) p^2.
    Defaults l = 1.5, m = 1, g = 2 (focal weight not detached, as in the reference code).
    Reduction: "sum" (reference) or "mean" (sum / (B * C)).
    """
    _check(logits, targets, observed)
    y = assume_negative_targets(targets, observed)
    p = torch.sigmoid(logits)
    per_entry = y * _focal_pos(logits - margin, gamma) + (1 - y) * (lam - p) * p**2
    return _reduce(per_entry, reduction)


@register_loss("splc")
def splc(
    logits: Tensor,
    targets: Tensor,
    observed: Tensor,
    tau: float = 0.6,
    margin: float = 1.0,
    gamma: float = 2.0,
    pseudo_label: bool = True,
    reduction: str = "sum",
) -> Tensor:
    """Self-paced loss correction (Zhang et al., 2021): focal-margin BCE with pseudo-positives.

    observed pos: -(1 - sigmoid(x - m))^g log sigmoid(x - m); pseudo-positives (unobserved
    with p > t, only when `pseudo_label`): -(1 - p)^g log p; other entries: -p^g log(1 - p).
    The paper corrects labels from epoch 1 on: the caller passes `pseudo_label=False` in
    epoch 0. Defaults t = 0.6, m = 1, g = 2. Reduction: "sum" (reference) or "mean".
    """
    _check(logits, targets, observed)
    y = assume_negative_targets(targets, observed)
    pseudo = torch.zeros_like(y)
    if pseudo_label:
        pseudo = (~observed & (torch.sigmoid(logits.detach()) > tau)).to(y.dtype)
    per_entry = (
        y * _focal_pos(logits - margin, gamma)
        + pseudo * _focal_pos(logits, gamma)
        + (1 - y - pseudo) * _focal_neg(logits, gamma)
    )
    return _reduce(per_entry, reduction)


# ---------------------------------------------------------------------------------------------
# Other members
# ---------------------------------------------------------------------------------------------


@register_loss("asl")
def asl(
    logits: Tensor,
    targets: Tensor,
    observed: Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    reduction: str = "sum",
) -> Tensor:
    """Asymmetric loss (Ridnik et al., ICCV 2021), with unknowns assumed negative.

    pos: -(1 - p)^g+ log p; observed neg and unobserved: -p_m^g- log(1 - p_m),
    p_m = max(p - m, 0). The focusing weights are detached (as in the authors' training
    script). Unobserved entries count as negatives, as in the single-positive reruns of ASL.
    Defaults g- = 4, g+ = 0, m = 0.05. Reduction: "sum" (reference) or "mean".
    """
    _check(logits, targets, observed)
    y = assume_negative_targets(targets, observed)
    p = torch.sigmoid(logits)
    if clip > 0:  # log(1 - p_m) = log(min(1 - p + m, 1)); the argument is >= m, so finite
        log_neg = torch.log((torch.sigmoid(-logits) + clip).clamp(max=1.0))
    else:
        log_neg = -F.softplus(logits)
    with torch.no_grad():
        w_pos = (1 - p) ** gamma_pos
        w_neg = (p - clip).clamp(min=0) ** gamma_neg if clip > 0 else p**gamma_neg
    per_entry = y * w_pos * F.softplus(-logits) - (1 - y) * w_neg * log_neg
    return _reduce(per_entry, reduction)


@register_loss("partial_bce")
def partial_bce(
    logits: Tensor,
    targets: Tensor,
    observed: Tensor,
    a: float = -4.45,
    b: float = 5.45,
    c: float = 1.0,
) -> Tensor:
    """Partial-BCE (Durand et al., CVPR 2019): BCE on known labels, normalised per image.

    loss_i = g(f_i) / C * sum_{c observed} BCE(x_ic, y_ic), f_i = #observed_i / C,
    g(f) = a f^c + b; defaults a = -4.45, b = 5.45, c = 1 (g(1) = 1, g(0.1) ~ 5).
    An image with no known label contributes 0. Reduction: mean over the batch (B).
    """
    _check(logits, targets, observed)
    num_classes = logits.shape[1]
    frac = observed.sum(dim=1).to(logits.dtype) / num_classes  # (B,)
    scale = (a * frac**c + b) / num_classes  # (B,)
    weight = observed * scale[:, None]  # (B, C): the per-image scale on observed entries, 0 elsewhere
    y = assume_negative_targets(targets, observed)
    return _bce(logits, y, weight=weight, reduction="sum") / logits.shape[0]


@register_loss("focal")
def focal(
    logits: Tensor,
    targets: Tensor,
    observed: Tensor,
    gamma: float = 2.0,
    alpha: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Focal loss (Lin et al., ICCV 2017) under assume negative (unknowns are negatives).

    pos: -a (1 - p)^g log p; observed neg and unobserved: -(1 - a) p^g log(1 - p);
    without `alpha` both weights are 1. Focal weights are not detached (as in the paper).
    Defaults g = 2, a = None. Reduction: "mean" (over B * C, like the Cole et al. family) or "sum".
    """
    _check(logits, targets, observed)
    y = assume_negative_targets(targets, observed)
    w_pos, w_neg = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
    per_entry = w_pos * y * _focal_pos(logits, gamma) + w_neg * (1 - y) * _focal_neg(logits, gamma)
    return _reduce(per_entry, reduction)


@register_loss("weighted_bce")
def weighted_bce(
    logits: Tensor, targets: Tensor, observed: Tensor, pos_weight: Tensor | None = None
) -> Tensor:
    """Assume-negative BCE with class-balancing positive weights.

    pos: -w_c log p; observed neg and unobserved: -log(1 - p). Pass a dataset-level
    `pos_weight` (C,) from `estimate_pos_weight(train_targets, train_observed)`
    (w_c = #negatives / #positives, unknowns counted as negatives, clipped to [0.01, 100]);
    with the default None it is estimated from this batch (noisy). Reduction: mean over B * C.
    """
    if pos_weight is None:
        pos_weight = estimate_pos_weight(targets, observed)
    return an(logits, targets, observed, pos_weight=pos_weight)


# ---------------------------------------------------------------------------------------------
# Chen et al., "Boosting single positive multi-label classification with generalized robust
# loss", IJCAI 2024 (GR loss)
# ---------------------------------------------------------------------------------------------


def _box_cox_nll(log_p: Tensor, q: float) -> Tensor:
    """(1 - p^q) / q from log p, per entry: the generalized cross-entropy; -log p at q = 0 (its limit).

    Written as -expm1(q log p) / q, so it is finite with a finite gradient for any finite log p.
    """
    return -log_p if q == 0 else -torch.expm1(q * log_p) / q


@torch.no_grad()
def gr_pseudo_label(probs: Tensor, w: float, b: float) -> Tensor:
    """GR loss's soft pseudo-label k(p; beta) = sigmoid(w p + b), beta = (w, b); no gradient."""
    return torch.sigmoid(w * probs + b)


@torch.no_grad()
def gr_weight(probs: Tensor, mu: float, sigma: float) -> Tensor:
    """GR loss's reweighting v(p; alpha) = exp(-(p - mu)^2 / (2 sigma^2)), alpha = (mu, sigma); no gradient."""
    return torch.exp(-((probs - mu) ** 2) / (2 * sigma**2))


@register_loss("gr")
def gr(
    logits: Tensor,
    targets: Tensor,
    observed: Tensor,
    w: float = 0.0,
    b: float = -2.0,
    mu: float = 0.5,
    sigma: float = 2.0,
    q2: float = 0.01,
    q3: float = 1.0,
) -> Tensor:
    """Generalized robust loss (Chen et al., IJCAI 2024) at fixed (w, b, mu, sigma).

    observed: BCE (pos -log p, neg -log(1-p)); unobserved: v(p) [k(p) L2(p) + (1 - k(p)) L3(p)] with
    the soft pseudo-label k(p) = sigmoid(w p + b) (`gr_pseudo_label`), the weight
    v(p) = exp(-(p - mu)^2 / (2 sigma^2)) (`gr_weight`), both computed from a detached p as in the
    reference code, and the robust losses L2(p) = (1 - p^q2) / q2 (towards 1; -log p at q2 = 0) and
    L3(p) = (1 - (1 - p)^q3) / q3 (towards 0; p itself at q3 = 1).
    The paper moves (w, b, mu, sigma) linearly over the epochs: the `gr` method does; this loss holds
    them at the schedule's start. Defaults (the authors' released config): w 0, b -2, mu 0.5,
    sigma 2, q2 0.01, q3 1. The paper has no observed negatives; here they keep their label (BCE).
    Reduction: mean over B * C (as in the reference code).
    """
    _check(logits, targets, observed)
    probs = torch.sigmoid(logits.detach())
    k, v = gr_pseudo_label(probs, w, b), gr_weight(probs, mu, sigma)                  # (B, C), no gradient
    towards_one = _box_cox_nll(F.logsigmoid(logits), q2)                               # L2(p)
    towards_zero = _box_cox_nll(F.logsigmoid(-logits), q3)                             # L3(p)
    unknown = v * (k * towards_one + (1 - k) * towards_zero)
    known = _bce(logits, assume_negative_targets(targets, observed))
    return torch.where(observed, known, unknown).mean()
