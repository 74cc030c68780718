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

Speed: each built-in loss computes its value and its gradient with respect to the logits in one
forward pass of elementwise operations (closed-form derivatives, sigmoid and softplus shared),
and backward is a single multiply; the observed entries (B of B * C with single positive labels)
are handled by index. At B = 256, C = 11,000 every loss costs at most about as much as torch's
BCE-with-logits forward + backward (`benchmarks/losses_metrics.py`). softplus is evaluated as
relu(x) + log(u) + (e - (u - 1)) / u, e = exp(-|x|), u = 1 + e: accurate to about one rounding
(torch's softplus and log1p are scalar loops on CPU, ~4x the vectorised log). Targets and weights
are constants: passing targets that require a gradient raises.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import numpy as np
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
    # Negatives: observed ones (soft targets count 1 - y), plus every unobserved entry if assume_negative.
    neg = (targets.shape[0] - pos) if assume_negative else (observed.sum(dim=0) - pos)
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


# ---------------------------------------------------------------------------------------------
# Closed-form values and gradients
#
# Every built-in loss below computes its value and its gradient with respect to the logits
# together, in a few elementwise passes that share sigmoid and softplus, and hands the gradient to
# autograd through `_ClosedForm` (backward: one multiply). Autograd through the composite
# expressions ran 20-70 elementwise kernels forward and backward, each allocating a (B, C)
# tensor, and torch's softplus / log-sigmoid / log1p are scalar loops on CPU (~4x `log`).
#
# Losses that treat unknown labels alike (assume negative, ignore, down-weight, entropy, ...) are
# split into a dense part for every entry as if it were unobserved, and the observed entries,
# taken by index and overwritten: with single positive labels the second part is B entries, not
# B * C, and the (expensive) positive terms are computed only there.
# ---------------------------------------------------------------------------------------------

Entrywise = Callable[[Tensor], tuple[Tensor, Tensor]]  # x -> (loss per entry, its derivative)


class _ClosedForm(torch.autograd.Function):
    """A scalar loss of the logits from `value_and_grad(x) -> (value, grad, scale)`: the loss is
    value * scale, its gradient grad * scale (grad shaped as x). The scale is applied in backward,
    folded into the multiply by the incoming gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, value_and_grad: Callable[[Tensor], tuple[Tensor, Tensor, float]]) -> Tensor:
        value, grad, scale = value_and_grad(logits.contiguous())
        ctx.save_for_backward(grad)
        ctx.scale = scale
        return value * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad * (grad_output * ctx.scale), None


def _closed_form(logits: Tensor, value_and_grad: Callable[[Tensor], tuple[Tensor, Tensor, float]], *constants: Tensor | None) -> Tensor:
    """`_ClosedForm` on `logits`; the `constants` (targets, weights) must not need a gradient."""
    for c in constants:
        if c is not None and c.requires_grad:
            raise ValueError("the built-in losses differentiate with respect to the logits only; "
                             "pass targets and weights detached")
    return _ClosedForm.apply(logits, value_and_grad)


def _log1p_exp_neg_abs(x: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """log(1 + e^-|x|) into `out`, in [0, log 2], to about one rounding, through the vectorised
    `log` (log1p is a scalar loop on CPU): with u = 1 + e rounded, log1p(e) = log(u) + (e - (u - 1)) / u
    (the first-order correction for the rounding of u; exact when u == 1). `scratch` is overwritten."""
    e = torch.abs(x, out=scratch).neg_().exp_()  # e^-|x| in (0, 1]
    u = torch.add(e, 1, out=out)
    e.sub_(u.sub_(1))  # e - (u - 1), exact: u - 1 is exact for u in [1, 2]
    e.div_(u.add_(1))  # ... relative to u (u - 1 + 1 == u exactly)
    return u.log_().add_(e)


def _softplus(x: Tensor, out: Tensor, scratch: Tensor) -> Tensor:
    """softplus(x) = log(1 + e^x) = -log(1 - sigmoid(x)) = relu(x) + log(1 + e^-|x|), into `out`."""
    _log1p_exp_neg_abs(x, out, scratch)
    return out.add_(torch.clamp_min(x, 0, out=scratch))


def _bce_entries(x: Tensor, y: Tensor, pos_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """BCE with logits per entry, w y (-log p) + (1 - y)(-log(1 - p)), and its derivative in x.

    With c = 1 - y + w y: loss = c softplus(x) - w y x, d/dx = c p - w y (w = 1 without
    `pos_weight`, which is broadcast against x)."""
    loss, grad = torch.empty_like(x), torch.empty_like(x)
    _softplus(x, loss, grad)
    torch.sigmoid(x, out=grad)
    if pos_weight is None:
        return loss.addcmul_(y, x, value=-1), grad.sub_(y)
    wy = y * pos_weight
    c = (wy - y).add_(1)
    return loss.mul_(c).addcmul_(wy, x, value=-1), grad.mul_(c).sub_(wy)


def _softplus_entries(x: Tensor, weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """weight * -log(1 - p) per entry and its derivative weight * p (the assume-negative term)."""
    loss, grad = torch.empty_like(x), torch.empty_like(x)
    _softplus(x, loss, grad)
    torch.sigmoid(x, out=grad)
    if weight != 1.0:
        loss.mul_(weight), grad.mul_(weight)
    return loss, grad


def _pow_(p: Tensor, gamma: float) -> Tensor:
    """p ** gamma in place, for p in [0, 1] (gamma = 1, 2, 4 as multiplies)."""
    if gamma == 1:
        return p
    if gamma in (2, 4):
        p.square_()
        return p.square_() if gamma == 4 else p
    return p.pow_(gamma)


def _focal_neg_entries(x: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """-p^g log(1 - p) per entry and its derivative p^g (g (1 - p) softplus(x) + p), focal weight
    not detached. The positive term -(1 - p)^g log p is this at -x, with the derivative negated."""
    loss, grad = torch.empty_like(x), torch.empty_like(x)
    _softplus(x, loss, grad)
    p = torch.sigmoid(x)
    torch.neg(x, out=grad).sigmoid_()  # 1 - p without cancellation
    grad.mul_(loss).mul_(gamma).add_(p)
    w = _pow_(p, gamma)  # p^g
    return loss.mul_(w), grad.mul_(w)


def _focal_pos_entries(x: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """-(1 - p)^g log p per entry and its derivative."""
    loss, grad = _focal_neg_entries(-x, gamma)
    return loss, grad.neg_()


def _observed_index(observed: Tensor) -> Tensor:
    """(K,) long: the flat (row-major) indices of the True entries of `observed` (B, C). On CPU
    through numpy, ~5x faster than torch.nonzero."""
    if observed.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(observed.numpy()))
    return observed.reshape(-1).nonzero().squeeze(1)


def _split_observed(
    x: Tensor,
    targets: Tensor,
    idx: Tensor,
    unobserved: Entrywise | None,
    observed_fn: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """Sum of a loss over (B, C) entries and its gradient (B, C), unscaled.

    `unobserved(x)` gives the loss of every entry as if it were unobserved (None: 0) and
    `observed_fn(x_o, y_o, idx)` that of the observed entries, (K,) each, given their logits,
    targets (the only targets read) and flat indices `idx` (from `_observed_index`); it replaces
    the dense value there.
    """
    x_o = x.reshape(-1)[idx]  # (K,)
    y_o = targets.reshape(-1)[idx].to(x.dtype)  # (K,)
    if unobserved is None:
        total, grad = x.new_zeros(()), torch.zeros_like(x)
    else:
        value, grad = unobserved(x)  # (B, C) each
        total = value.reshape(-1).index_fill_(0, idx, 0).sum()
    value_o, grad_o = observed_fn(x_o, y_o, idx)
    grad.reshape(-1).index_copy_(0, idx, grad_o)
    return total + value_o.sum(), grad


def _class_of(weight: Tensor | None, idx: Tensor, num_classes: int, like: Tensor) -> Tensor | None:
    """The per-class `weight` (C,) at flat entry indices `idx` (K,): (K,), or None."""
    return None if weight is None else weight.to(like)[idx % num_classes]


# ---------------------------------------------------------------------------------------------
# Full labels and masks
# ---------------------------------------------------------------------------------------------


def _bce_observed(pos_weight: Tensor | None, num_classes: int):
    """`observed_fn` for `_split_observed`: BCE on the observed entries (class weights by index)."""
    def fn(x_o: Tensor, y_o: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        return _bce_entries(x_o, y_o, _class_of(pos_weight, idx, num_classes, x_o))
    return fn


def _mix(y: Tensor, pos: tuple[Tensor, Tensor], neg: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """y * pos + (1 - y) * neg for (loss, derivative) pairs (soft targets enter linearly)."""
    return tuple(n + y * (p - n) for p, n in zip(pos, neg))  # type: ignore[return-value]


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

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        loss, grad = _bce_entries(x, targets.to(x.dtype), None if pos_weight is None else pos_weight.to(x))
        return loss.sum(), grad, 1.0 / x.numel()

    return _closed_form(logits, value_and_grad, targets, pos_weight)


@register_loss("masked_bce")
def masked_bce(
    logits: Tensor, targets: Tensor, observed: Tensor, pos_weight: Tensor | None = None
) -> Tensor:
    """BCE on observed entries only (partial labels, unobserved entries ignored).

    loss = sum_{observed} -[w_c y log p + (1 - y) log(1 - p)] / #observed, w = `pos_weight` or 1.
    Reduction: mean over observed entries; 0 (with a graph) when nothing is observed.
    """
    _check(logits, targets, observed)

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        idx = _observed_index(observed)
        total, grad = _split_observed(x, targets, idx, None, _bce_observed(pos_weight, x.shape[1]))
        return total, grad, 1.0 / max(idx.numel(), 1)

    return _closed_form(logits, value_and_grad, targets, pos_weight)


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

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        total, grad = _split_observed(x, targets, _observed_index(observed), _softplus_entries, _bce_observed(pos_weight, x.shape[1]))
        return total, grad, 1.0 / x.numel()

    return _closed_form(logits, value_and_grad, targets, pos_weight)


@register_loss("an_ls")
def an_ls(logits: Tensor, targets: Tensor, observed: Tensor, eps: float = 0.1) -> Tensor:
    """Assume negative with label smoothing (Cole et al., CVPR 2021).

    pos: (1-e)(-log p) + e(-log(1-p)); neg and unobserved: (1-e)(-log(1-p)) + e(-log p),
    i.e. BCE against y (1 - 2e) + e with y the assume-negative target. Default e = 0.1.
    Reduction: mean over B * C.
    """
    _check(logits, targets, observed)

    def unobserved(x: Tensor) -> tuple[Tensor, Tensor]:  # BCE against e: softplus(x) - e x
        loss, grad = _softplus_entries(x)
        return loss.add_(x, alpha=-eps), grad.sub_(eps)

    def observed_fn(x_o: Tensor, y_o: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        return _bce_entries(x_o, y_o * (1 - 2 * eps) + eps)

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        total, grad = _split_observed(x, targets, _observed_index(observed), unobserved, observed_fn)
        return total, grad, 1.0 / x.numel()

    return _closed_form(logits, value_and_grad, targets)


@register_loss("wan")
def wan(logits: Tensor, targets: Tensor, observed: Tensor, gamma: float | None = None) -> Tensor:
    """Weak assume negative (Cole et al., CVPR 2021): down-weighted negatives for unknowns.

    observed: BCE (pos -log p, neg -log(1-p)); unobserved: -g log(1 - p).
    Default g = 1 / (C - 1) (1 when C = 1). Reduction: mean over B * C.
    """
    _check(logits, targets, observed)
    if gamma is None:
        gamma = 1.0 / max(logits.shape[1] - 1, 1)

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        unobserved = functools.partial(_softplus_entries, weight=gamma)
        total, grad = _split_observed(x, targets, _observed_index(observed), unobserved, _bce_observed(None, x.shape[1]))
        return total, grad, 1.0 / x.numel()

    return _closed_form(logits, value_and_grad, targets)


@register_loss("epr")
def epr(logits: Tensor, targets: Tensor, observed: Tensor, k: float = 1.5) -> Tensor:
    """Expected positive regularisation (Cole et al., CVPR 2021).

    observed: BCE (pos -log p, neg -log(1-p)); unobserved: 0; plus
    (mean_b sum_c p - k)^2 / C^2 (see `epr_regulariser`). k is the expected number of
    positives per image, dataset-specific: VOC 1.5 (the default), COCO 2.9, NUS 1.9, CUB 31.4.
    Reduction: mean over B * C of the entry losses, regulariser added after.
    """
    _check(logits, targets, observed)

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        b, c = x.shape
        total, grad = _split_observed(x, targets, _observed_index(observed), None, _bce_observed(None, c))
        s = torch.sigmoid(x)
        excess = s.sum() / b - k  # mean_b sum_c p - k
        torch.abs(x, out=s).neg_().sigmoid_()  # s = sigmoid(-|x|): p (1 - p) = s - s^2 without cancellation
        # d/dx of excess^2 / C^2 is 2 excess p (1 - p) / (B C^2); in units of the 1 / (B C) scale: 2 excess / C.
        coef = float(2 * excess / c)
        grad.add_(s, alpha=coef).addcmul_(s, s, value=-coef)
        return total + excess**2 * (b / c), grad, 1.0 / (b * c)

    return _closed_form(logits, value_and_grad, targets)


# ---------------------------------------------------------------------------------------------
# Zhou et al., "Acknowledging the unknown for multi-label learning with single positive
# labels", ECCV 2022
# ---------------------------------------------------------------------------------------------


def _neg_entropy_entries(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """-a H(sigmoid(x)) per entry and its derivative a x p (1 - p).

    H = log(1 + e^-|x|) + |x| sigmoid(-|x|) (as `entropy_from_logits`), p (1 - p) = s (1 - s)
    with s = sigmoid(-|x|): no cancellation in either."""
    a = x.abs()
    e = torch.neg(a).exp_()  # e^-|x|
    u = e + 1
    s = e / u  # sigmoid(-|x|)
    e.sub_(u.sub_(1)).div_(u.add_(1))  # log(1 + e^-|x|) = log(u) + e, as in `_log1p_exp_neg_abs`
    loss = u.log_().add_(e).addcmul_(a, s).mul_(-alpha)
    grad = torch.mul(s, x, out=e)
    grad.addcmul_(grad, s, value=-1).mul_(alpha)  # a x s (1 - s)
    return loss, grad


@register_loss("em")
def em(logits: Tensor, targets: Tensor, observed: Tensor, alpha: float = 0.1) -> Tensor:
    """Entropy maximisation (Zhou et al., ECCV 2022).

    observed: BCE (pos -log p, neg -log(1-p)); unobserved: -a H(p), H the binary entropy
    (so minimising the loss maximises the entropy of unknown labels). Default a = 0.1
    (COCO, NUS; VOC 0.2, CUB 0.01). Reduction: mean over B * C.
    """
    _check(logits, targets, observed)

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        unobserved = functools.partial(_neg_entropy_entries, alpha=alpha)
        total, grad = _split_observed(x, targets, _observed_index(observed), unobserved, _bce_observed(None, x.shape[1]))
        return total, grad, 1.0 / x.numel()

    return _closed_form(logits, value_and_grad, targets)


# ---------------------------------------------------------------------------------------------
# Zhang et al., "Simple and robust loss design for multi-label learning with missing labels",
# 2021 (Hill and SPLC)
# ---------------------------------------------------------------------------------------------


def _hill_neg_entries(x: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """(l - p) p^2 per entry and its derivative p^2 (1 - p) (2 l - 3 p)."""
    grad = torch.sigmoid(x)
    p2 = grad * grad
    loss = torch.mul(grad, -1).add_(lam).mul_(p2)
    grad.mul_(-3).add_(2 * lam).mul_(p2).mul_(torch.neg(x, out=p2).sigmoid_())  # (1 - p) without cancellation
    return loss, grad


def _reduction_scale(reduction: str, numel: int) -> float:
    """The factor a reduction applies to the summed loss: 1 for 'sum', 1 / (B * C) for 'mean'."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}'; known: {', '.join(_REDUCTIONS)}")
    return 1.0 if reduction == "sum" else 1.0 / numel


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
    scale = _reduction_scale(reduction, logits.numel())

    def observed_fn(x_o: Tensor, y_o: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        return _mix(y_o, _focal_pos_entries(x_o - margin, gamma), _hill_neg_entries(x_o, lam))

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        unobserved = functools.partial(_hill_neg_entries, lam=lam)
        total, grad = _split_observed(x, targets, _observed_index(observed), unobserved, observed_fn)
        return total, grad, scale

    return _closed_form(logits, value_and_grad, targets)


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
    scale = _reduction_scale(reduction, logits.numel())

    def unobserved(x: Tensor) -> tuple[Tensor, Tensor]:
        if not pseudo_label:
            return _focal_neg_entries(x, gamma)
        sign = torch.where(torch.sigmoid(x) > tau, -1.0, 1.0).to(x.dtype)  # (B, C): -1 on pseudo-positives
        # A pseudo-positive's term -(1 - p)^g log p is the negative one at -x.
        loss, grad = _focal_neg_entries(x * sign, gamma)
        return loss, grad.mul_(sign)

    def observed_fn(x_o: Tensor, y_o: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        return _mix(y_o, _focal_pos_entries(x_o - margin, gamma), _focal_neg_entries(x_o, gamma))

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        total, grad = _split_observed(x, targets, _observed_index(observed), unobserved, observed_fn)
        return total, grad, scale

    return _closed_form(logits, value_and_grad, targets)


# ---------------------------------------------------------------------------------------------
# Other members
# ---------------------------------------------------------------------------------------------


def _asl_neg_entries(x: Tensor, gamma_neg: float, clip: float) -> tuple[Tensor, Tensor]:
    """ASL's negative term -w log(1 - p_m), p_m = max(p - m, 0), w = p_m^g- held constant, and its
    derivative w p (1 - p) / (1 - p + m) (0 where the clip saturates, p <= m)."""
    grad = torch.sigmoid(x)
    if clip <= 0:
        loss, w = torch.empty_like(x), torch.empty_like(x)
        _softplus(x, loss, w)
        _pow_(w.copy_(grad), gamma_neg)
        return loss.mul_(w), grad.mul_(w)
    w = _pow_(torch.sub(grad, clip).clamp_min_(0), gamma_neg)  # p_m^g-
    loss = torch.neg(x).sigmoid_()  # 1 - p without cancellation
    grad.mul_(loss)  # p (1 - p)
    loss.add_(clip)  # 1 - p_m where p > m
    grad.div_(loss).mul_(w)
    if gamma_neg == 0:  # w = 1 everywhere: the clip's zero derivative where it saturates (elsewhere w = 0 there)
        grad.masked_fill_(loss > 1, 0)
    return loss.clamp_max_(1).log_().mul_(w).neg_(), grad


def _asl_pos_entries(x: Tensor, gamma_pos: float) -> tuple[Tensor, Tensor]:
    """ASL's positive term -w log p, w = (1 - p)^g+ held constant, and its derivative -w (1 - p)."""
    loss, grad = torch.empty_like(x), torch.empty_like(x)
    _softplus(-x, loss, grad)
    q = torch.neg(x).sigmoid_()
    w = _pow_(torch.clone(q), gamma_pos)
    return loss.mul_(w), q.mul_(w).neg_()


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
    scale = _reduction_scale(reduction, logits.numel())

    def observed_fn(x_o: Tensor, y_o: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        return _mix(y_o, _asl_pos_entries(x_o, gamma_pos), _asl_neg_entries(x_o, gamma_neg, clip))

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        unobserved = functools.partial(_asl_neg_entries, gamma_neg=gamma_neg, clip=clip)
        total, grad = _split_observed(x, targets, _observed_index(observed), unobserved, observed_fn)
        return total, grad, scale

    return _closed_form(logits, value_and_grad, targets)


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
    batch, num_classes = logits.shape

    def observed_fn(x_o: Tensor, y_o: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        rows = idx // num_classes  # (K,)
        frac = torch.bincount(rows, minlength=batch).to(x_o.dtype) / num_classes  # (B,) known fraction per image
        scale = ((a * frac**c + b) / num_classes)[rows]  # (K,) each entry's image scale
        loss, grad = _bce_entries(x_o, y_o)
        return loss.mul_(scale), grad.mul_(scale)

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        total, grad = _split_observed(x, targets, _observed_index(observed), None, observed_fn)
        return total, grad, 1.0 / batch

    return _closed_form(logits, value_and_grad, targets)


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
    scale = _reduction_scale(reduction, logits.numel())
    w_pos, w_neg = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)

    def unobserved(x: Tensor) -> tuple[Tensor, Tensor]:
        loss, grad = _focal_neg_entries(x, gamma)
        return (loss, grad) if w_neg == 1.0 else (loss.mul_(w_neg), grad.mul_(w_neg))

    def observed_fn(x_o: Tensor, y_o: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        pos = tuple(w_pos * t for t in _focal_pos_entries(x_o, gamma))
        return _mix(y_o, pos, unobserved(x_o))  # type: ignore[arg-type]

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        total, grad = _split_observed(x, targets, _observed_index(observed), unobserved, observed_fn)
        return total, grad, scale

    return _closed_form(logits, value_and_grad, targets)


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

    def unobserved(x: Tensor) -> tuple[Tensor, Tensor]:
        return _gr_unobserved_entries(x, w, b, mu, sigma, q2, q3)

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor, float]:
        total, grad = _split_observed(x, targets, _observed_index(observed), unobserved, _bce_observed(None, x.shape[-1]))
        return total, grad, 1.0 / x.numel()

    return _closed_form(logits, value_and_grad, targets)


def _box_cox_entries(nll: Tensor, q: float) -> Tensor:
    """(1 - p^q) / q per entry from nll = -log p (in place into `nll`); nll itself at q = 0."""
    return nll if q == 0 else nll.mul_(-q).expm1_().div_(-q)


def _gr_unobserved_entries(x: Tensor, w: float, b: float, mu: float, sigma: float, q2: float, q3: float
                           ) -> tuple[Tensor, Tensor]:
    """GR loss of every entry as unobserved, v (k L2 + (1 - k) L3), and its derivative in x with k, v held.

    d L2 / dx = -p^q2 (1 - p) and d L3 / dx = (1 - p)^q3 p (both from dp/dx = p (1 - p)), so
    grad = v (k dL2 + (1 - k) dL3); p^q and (1 - p)^q come from the same -log p, -log(1 - p).
    """
    nll_pos, scratch = torch.empty_like(x), torch.empty_like(x)
    _softplus(torch.neg(x), nll_pos, scratch)                      # -log p
    nll_neg = torch.add(nll_pos, x)                                # -log(1 - p) = -log p + x
    p = torch.sigmoid(x)
    one_minus_p = torch.neg(x, out=scratch).sigmoid_()             # 1 - p without cancellation
    d_one = torch.mul(nll_pos, -q2).exp_().mul_(one_minus_p).neg_()        # -p^q2 (1 - p)
    if q3 == 1:                                                    # the default: L3 = p, exactly
        d_zero, loss_zero = torch.mul(one_minus_p, p), p.clone()
    else:
        d_zero = torch.mul(nll_neg, -q3).exp_().mul_(p)                     # (1 - p)^q3 p
        loss_zero = _box_cox_entries(nll_neg, q3)
    loss_one = _box_cox_entries(nll_pos, q2)
    v, k = gr_weight(p, mu, sigma), gr_pseudo_label(p, w, b)      # (B, C) each, no gradient
    loss = loss_one.sub_(loss_zero).mul_(k).add_(loss_zero).mul_(v)
    grad = d_one.sub_(d_zero).mul_(k).add_(d_zero).mul_(v)
    return loss, grad
