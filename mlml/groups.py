"""Exclusive label groups with an unknown class: per-group targets, losses and decoding.

An exclusive group g with K labels is predicted by one softmax over K outputs, plus one more, the
*unknown* (none of these) class K, when `g.has_unknown`. Everything here works on the usual
`targets` (B, C) / `observed` (B, C) pair, so any observation model feeds it unchanged.

Per (image, exclusive group), `group_targets` decides one of three cases:

1. **observed**: a label of g is observed positive -> its index k in the group (0..K-1).
2. **known not to apply** -> K (unknown), when either
   - g has `applies_to` labels and every one of them is *known negative* for the image, or
   - every label of g is observed negative (the group's annotator said "none of these").
   A label is known negative when it is observed negative, or when another label of its own
   exclusive group is observed positive (exclusivity: an image showing a triangle shows no circle).
   So with single-positive labels, an observed "triangle" tells that `pattern` (applies to circle
   and square) does not apply; with per-group labels, the `object` collection tells it through
   the shape, and the `pattern` collection tells it directly ("none").
   The case is trained on only when g has an unknown class; without one it is masked.
3. **unobserved**: anything else -> masked out (or pseudo-labelled by a teacher,
   `pseudo_group_targets`).

Non-exclusive groups have no class index: their labels keep independent sigmoids.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mlml.labels import Group, LabelSpace


class GroupTargets(NamedTuple):
    """Per-image targets of one exclusive group.

    Attributes:
        cls: long (B,) class index in 0..K-1, or K = unknown (not applicable / none); K also where
            `mask` is False (a placeholder, never read).
        mask: bool (B,) True where the class is known and trainable.
    """

    cls: Tensor
    mask: Tensor


def exclusive_groups(space: LabelSpace) -> list[Group]:
    return [g for g in space.groups if g.exclusive]


def known_negative(targets: Tensor, observed: Tensor, space: LabelSpace) -> Tensor:
    """bool (B, C): labels observed negative, or implied negative by an observed positive of
    another label of the same exclusive group."""
    positive = observed & (targets > 0.5)                                       # (B, C)
    negative = observed & ~positive
    for g in exclusive_groups(space):
        idx = list(g.labels)
        pos = positive[:, idx]                                                  # (B, K)
        negative[:, idx] |= pos.any(1, keepdim=True) & ~pos
    return negative


def group_targets(targets: Tensor, observed: Tensor, space: LabelSpace) -> dict[str, GroupTargets]:
    """The three cases (module docstring) for every exclusive group.

    Args:
        targets: float (B, C) in [0, 1] (> 0.5 counts as positive); read only where observed.
        observed: bool (B, C).
        space: the label space; only its exclusive groups get targets.

    Returns:
        group name -> `GroupTargets` (cls (B,), mask (B,)).
    """
    positive = observed & (targets > 0.5)                                       # (B, C)
    negative = known_negative(targets, observed, space)
    out = {}
    for g in exclusive_groups(space):
        idx = list(g.labels)
        K = len(idx)
        pos = positive[:, idx]                                                  # (B, K)
        has_pos = pos.any(1)
        none = negative[:, idx].all(1)                                          # annotator: "none of these"
        if g.applies_to:
            none |= negative[:, list(g.applies_to)].all(1)                      # the group does not apply
        none &= ~has_pos                                                        # an observed class wins
        cls = torch.where(has_pos, pos.float().argmax(1), torch.full_like(has_pos, K, dtype=torch.long))
        mask = has_pos | (none & g.has_unknown)
        out[g.name] = GroupTargets(cls, mask)
    return out


def group_cross_entropy(group_logits: dict[str, Tensor], targets: dict[str, GroupTargets]) -> dict[str, Tensor]:
    """Per group: cross-entropy summed over the images whose class is known, divided by the batch size B.

    Dividing by B (not by the number of known images) keeps a group seen in few images of a batch
    from being up-weighted; summing the returned values gives the grouped loss.

    Args:
        group_logits: name -> float (B, K_g [+1]) raw softmax scores of the grouped head.
        targets: name -> `GroupTargets` (from `group_targets`); groups missing here are skipped.
    """
    out = {}
    for name, t in targets.items():
        z = group_logits[name].float()                                          # (B, K [+1])
        if t.mask.any() and int(t.cls[t.mask].max()) >= z.shape[1]:
            raise ValueError(f"group '{name}': target unknown (class {z.shape[1]}) but the head has no unknown output")
        ce = F.cross_entropy(z, t.cls.clamp(max=z.shape[1] - 1), reduction="none")   # (B,)
        out[name] = torch.where(t.mask, ce, torch.zeros_like(ce)).sum() / z.shape[0]
    return out


def label_logits_from_softmax(z: Tensor, num_labels: int) -> Tensor:
    """float (B, K): logit(p_k) of the first K softmax classes of z (B, K [+1]), so that
    sigmoid of the result is the softmax probability; stable (log-space) for |z| up to 100.

    logit(p_k) = log p_k - log(1 - p_k), with log(1 - p_k) = logsumexp of the other classes' log p.
    """
    n = z.shape[1]
    if n < 2:
        raise ValueError("a softmax over fewer than 2 outputs is constant")
    lp = F.log_softmax(z.float(), dim=1)                                        # (B, n)
    others = lp[:, None, :].expand(-1, num_labels, -1)                          # (B, K, n)
    diagonal = torch.eye(num_labels, n, dtype=torch.bool, device=z.device)      # (K, n): k == j
    log1m = others.masked_fill(diagonal, float("-inf")).logsumexp(-1)           # (B, K)
    return lp[:, :num_labels] - log1m


class GroupPrediction(NamedTuple):
    """Decoded prediction of one exclusive group over N images.

    Attributes:
        probs: float (N, K + 1) class probabilities and, last, the unknown score.
        pred: long (N,) predicted class, K = unknown.
    """

    probs: Tensor
    pred: Tensor


def decode_groups(scores: Tensor, space: LabelSpace, softmax_groups: dict[str, bool], threshold: float = 0.5) -> dict[str, GroupPrediction]:
    """Per exclusive group: the predicted class or unknown, from per-label probabilities (N, C).

    Softmax groups (those in `softmax_groups`, name -> has an unknown output; the per-label scores
    of a grouped head are its softmax probabilities): unknown = 1 - sum of the class probabilities
    (exactly 0 without an unknown output); prediction = argmax over the K + 1.
    Independent sigmoids (any other exclusive group): unknown = prod(1 - p_k), the probability of
    none under independence; prediction = argmax p_k if it reaches `threshold`, else unknown.
    """
    out = {}
    for g in exclusive_groups(space):
        p = scores[:, list(g.labels)].float()                                   # (N, K)
        K = p.shape[1]
        if g.name in softmax_groups:
            unknown = (1 - p.sum(1)).clamp(min=0) if softmax_groups[g.name] else torch.zeros_like(p[:, 0])
            probs = torch.cat([p, unknown[:, None]], 1)
            pred = probs.argmax(1)
        else:
            probs = torch.cat([p, (1 - p).prod(1, keepdim=True)], 1)
            best, arg = p.max(1)
            pred = torch.where(best >= threshold, arg, torch.full_like(arg, K))
        out[g.name] = GroupPrediction(probs, pred)
    return out


def pseudo_group_targets(teacher_group_logits: dict[str, Tensor], targets: dict[str, GroupTargets], threshold: float) -> dict[str, GroupTargets]:
    """Fill the unobserved (masked) entries with the teacher's argmax class where its softmax
    probability reaches `threshold` (case 3 of the module docstring); known entries are kept.

    Args:
        teacher_group_logits: name -> float (B, K_g [+1]) of a teacher (e.g. an EMA model), no grad.
        targets: from `group_targets`.
    """
    out = {}
    for name, t in targets.items():
        conf, arg = torch.softmax(teacher_group_logits[name].detach().float(), 1).max(1)   # (B,)
        fill = ~t.mask & (conf >= threshold)
        out[name] = GroupTargets(torch.where(fill, arg, t.cls), t.mask | fill)
    return out
