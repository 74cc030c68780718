"""Multi-label evaluation metrics as pure, vectorised torch functions.

Every function takes `scores: float (N, C)` (probabilities, logits or any other score where higher
means "more likely positive") and `targets: (N, C)` in {0, 1} (bool, int or float), and computes on
the device of its inputs. Results agree with scikit-learn (`average_precision_score`,
`roc_auc_score`, `f1_score(zero_division=0)`, `hamming_loss`), ties included: samples with equal
scores form one threshold, never an arbitrary order.

Partially annotated data (Open Images: only verified labels count): every metric takes an optional
`mask: bool (N, C)`, True on the annotated entries, and is then computed on each class's annotated
entries only, equal to scikit-learn on those entries (masked AP, AUROC, F1, Hamming, thresholds).

The ranking metrics share one idea: sort each column by decreasing score once, find the block of
tied scores each sample belongs to, and read true/false positive counts at the block boundaries.
That turns AP, ROC AUC and the best-F1 threshold search into a few (N, C) tensor operations with no
loop over samples or classes. They run over chunks of classes (`CHUNK_BYTES` of working memory), so
their peak memory stays bounded whatever C; fully annotated AP takes a faster path that sorts each
class once and reads every positive's rank by binary search.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

Average = Literal["macro", "micro"] | None

__all__ = [
    "auroc",
    "average_precision",
    "calibrate_thresholds",
    "classes_without_positives",
    "f1_score",
    "decoded_accuracy",
    "group_accuracy",
    "hamming_loss",
    "mean_average_precision",
    "multilabel_metrics",
    "unknown_accuracy",
    "unknown_auroc",
]

# Counts are accumulated in float64: exact up to 2**53 samples, and ratios of them stay within
# 1e-15 of scikit-learn whatever the score dtype.
_COUNT_DTYPE = torch.float64


def _check_mask(scores: Tensor, mask: Tensor | None) -> Tensor | None:
    """Validates an annotation mask (None: every entry annotated) and returns it as bool (N, C)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.shape != scores.shape:
        raise ValueError(f"mask must be a tensor of the scores' shape {tuple(scores.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if mask.device != scores.device:
        raise ValueError(f"mask is on {mask.device} but scores are on {scores.device}")
    return mask.bool()


def _check_inputs(scores: Tensor, targets: Tensor) -> Tensor:
    """Validates a (scores, targets) pair and returns the targets as bool (N, C)."""
    for name, x in (("scores", scores), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if scores.ndim != 2:
        raise ValueError(
            f"scores must be 2-D (N, C), got shape {tuple(scores.shape)}; "
            "for a single class use scores[:, None]"
        )
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} differs from scores shape {tuple(scores.shape)}"
        )
    if scores.numel() == 0:
        raise ValueError(f"scores and targets are empty, shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if targets.device != scores.device:
        raise ValueError(f"targets are on {targets.device} but scores are on {scores.device}")
    if not torch.isfinite(scores.sum()) and torch.isnan(scores).any():  # the sum: one pass, no (N, C) mask
        raise ValueError("scores contain NaN")
    if targets.dtype != torch.bool and not ((targets == 0) | (targets == 1)).all():
        raise ValueError("targets must contain only 0 and 1 (missing labels are not allowed here)")
    return targets.bool()


def _check_average(average: str | None, allowed: tuple[str | None, ...]) -> None:
    if average not in allowed:
        raise ValueError(f"unknown average {average!r}; known: {', '.join(map(repr, allowed))}")


class _Ranked(NamedTuple):
    """Per-class counts with each column sorted by decreasing score.

    Row k of every (N, C) field refers to the k-th highest-scored sample of each class. "At" counts
    are those predicted positive when thresholding at that sample's score (its whole tie block
    included); "above" counts include only samples with a strictly higher score.
    """

    sorted_scores: Tensor  # (N, C) decreasing down each column
    positive: Tensor  # (N, C) float64, target of the k-th ranked sample (0 where not annotated)
    block_end: Tensor  # (N, C) long, row of the last sample tied with the k-th
    count_at: Tensor  # (N, C) float64, annotated samples predicted positive at the k-th score
    tp_at: Tensor  # (N, C) float64
    fp_above: Tensor  # (N, C) float64
    num_pos: Tensor  # (C,) float64
    num_counted: Tensor  # (C,) float64, annotated samples


def _rank(scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> _Ranked:
    """Sorts each column by decreasing score and counts positives at tie-block boundaries.

    With `mask`, entries that are not annotated stay in the order (they may share a tie block) but
    count as neither positive nor negative.
    """
    n = scores.shape[0]
    sorted_scores, order = scores.sort(dim=0, descending=True)  # (N, C)
    if mask is not None:
        targets = targets & mask
    positive = targets.gather(0, order).to(_COUNT_DTYPE)  # (N, C)
    row = torch.arange(n, device=scores.device).unsqueeze(1).expand_as(scores)  # (N, C)

    new_value = sorted_scores[1:] != sorted_scores[:-1]  # (N-1, C): row k+1 starts a new block
    edge = torch.ones_like(sorted_scores[:1], dtype=torch.bool)  # (1, C)
    is_first = torch.cat([edge, new_value])  # (N, C)
    is_last = torch.cat([new_value, edge])  # (N, C)
    # Each row's block start is the latest "first" at or above it; its end the nearest "last" below.
    block_start = torch.where(is_first, row, 0).cummax(dim=0).values  # (N, C)
    block_end = torch.where(is_last, row, n).flip(0).cummin(dim=0).values.flip(0)  # (N, C)

    tp = positive.cumsum(dim=0)  # (N, C) positives among the top k+1
    tp_at = tp.gather(0, block_end)  # (N, C)
    tp_above = tp.gather(0, block_start) - positive.gather(0, block_start)  # (N, C)
    if mask is None:  # every sample counts: counts are row numbers
        count_at, count_above = (block_end + 1).to(_COUNT_DTYPE), block_start.to(_COUNT_DTYPE)  # (N, C)
        num_counted = torch.full_like(tp[0], n)  # (C,)
    else:
        counted = mask.gather(0, order).to(_COUNT_DTYPE)  # (N, C)
        seen = counted.cumsum(dim=0)  # (N, C) annotated samples among the top k+1
        count_at = seen.gather(0, block_end)  # (N, C)
        count_above = seen.gather(0, block_start) - counted.gather(0, block_start)  # (N, C)
        num_counted = counted.sum(dim=0)  # (C,)
    fp_above = count_above - tp_above  # (N, C)
    return _Ranked(sorted_scores, positive, block_end, count_at, tp_at, fp_above, positive.sum(dim=0), num_counted)


# Working memory of one chunk of classes in the ranking metrics (AP, AUROC, thresholds): bounds their
# peak memory whatever C (50,000 x 11,000 scores are 2.2 GB; unchunked intermediates would be ~20x that).
CHUNK_BYTES = 2**28


def _classes_per_chunk(n: int, bytes_per_entry: int) -> int:
    return max(1, CHUNK_BYTES // (bytes_per_entry * max(n, 1)))


def _sort_rows_(x: Tensor) -> Tensor:
    """Sorts each row of x (m, N) ascending, in place. On CPU through numpy, whose SIMD sort is
    ~3x faster than torch's for float32/float64 and needs no index array; torch elsewhere."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        x.numpy().sort(axis=1)
        return x
    return x.copy_(x.sort(dim=1).values)


def _columns_into(x: Tensor, out: Tensor, rows: int = 512, cols: int = 128) -> Tensor:
    """out (m, N) = x (N, m).T, copied in tiles of rows x cols (256 KB in float32, within a core's
    L2 cache): a column block of a row-major matrix read column by column misses the cache on
    every element (~35x slower on CPU)."""
    for j in range(0, x.shape[1], cols):
        for r in range(0, x.shape[0], rows):
            out[j : j + cols, r : r + rows].copy_(x[r : r + rows, j : j + cols].t())
    return out


def _samples_at_or_above(row: Tensor, thresholds: Tensor) -> Tensor:
    """(K,) long: the number of entries of `row` (N,) >= each of `thresholds` (K,), ascending.

    Only the entries >= the lowest threshold are sorted (the others count for none), then each
    threshold is a binary search: exact, ties included."""
    kept = row[row >= thresholds[0]]  # (M,) M <= N
    ascending = _sort_rows_(kept[None])[0]
    return ascending.numel() - torch.searchsorted(ascending, thresholds, right=False)


def _positives_by_class(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The positives' scores grouped by class, ascending within each class.

    Returns (K,) scores, (K,) classes (non-decreasing), (C,) counts per class."""
    if targets.device.type == "cpu":
        flat = torch.from_numpy(np.flatnonzero(targets.numpy()))  # ~5x faster than torch.nonzero
    else:
        flat = targets.reshape(-1).nonzero().squeeze(1)
    num_classes = scores.shape[1]
    rows, cols = flat // num_classes, flat % num_classes
    values = scores[rows, cols]  # (K,)
    by_value = torch.sort(values, stable=True).indices
    order = by_value[torch.sort(cols[by_value], stable=True).indices]  # by class, then by value
    return values[order], cols[order], torch.bincount(cols, minlength=num_classes)


def _average_precision_full(scores: Tensor, targets: Tensor) -> Tensor:
    """(C,) float64 AP of fully annotated (scores, bool targets), as the mean over the positives of
    #positives scored >= it / #samples scored >= it (ties share a threshold, as scikit-learn).

    Only the positives' ranks are needed: the positives are sorted per class once (few); in chunks
    of classes bounded by `CHUNK_BYTES` (columns transposed in cache-sized tiles), each class's
    samples scored at or above its lowest positive are sorted (numpy's SIMD sort on CPU) and each
    positive's count of samples scored >= it is a binary search there. Chunks run on
    `torch.get_num_threads()` threads (the sort releases the GIL)."""
    n, c = scores.shape
    value, cls, num_pos = _positives_by_class(scores, targets)  # (K,), (K,), (C,)
    start = num_pos.cumsum(0) - num_pos  # (C,) first positive of each class in `value`
    # Positives scored >= each positive: those of its class from the first one tied with it on.
    k = torch.arange(value.numel(), device=scores.device)
    first = torch.ones_like(value, dtype=torch.bool)
    first[1:] = (value[1:] != value[:-1]) | (cls[1:] != cls[:-1])
    first_tied = torch.where(first, k, 0).cummax(0).values  # (K,)
    positives_ge = (start[cls] + num_pos[cls] - first_tied).to(_COUNT_DTYPE)  # (K,)

    workers = torch.get_num_threads() if scores.device.type == "cpu" else 1
    step = _classes_per_chunk(n, bytes_per_entry=scores.element_size() * workers)  # all workers' buffers in CHUNK_BYTES
    samples_ge = torch.empty_like(positives_ge)  # (K,)

    first_pos, count = start.tolist(), num_pos.tolist()

    def chunk(i: int) -> None:
        m = min(step, c - i)
        if not any(count[i : i + m]):
            return
        columns = _columns_into(scores[:, i : i + m], scores.new_empty(m, n))  # (m, N)
        for j in range(i, i + m):
            lo, hi = first_pos[j], first_pos[j] + count[j]
            if hi > lo:
                samples_ge[lo:hi] = _samples_at_or_above(columns[j - i], value[lo:hi]).to(_COUNT_DTYPE)

    starts = range(0, c, step)
    workers = min(workers, len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(chunk, starts))
    else:
        for i in starts:
            chunk(i)
    precision_sum = torch.zeros(c, dtype=_COUNT_DTYPE, device=scores.device).index_add_(0, cls, positives_ge / samples_ge)
    return precision_sum / num_pos.to(_COUNT_DTYPE)  # (C,) 0/0 = NaN without positives


def _by_class_chunks(fn, scores: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
    """`fn(scores, targets, mask) -> (C,)` on chunks of classes (the `_rank` intermediates take
    ~120 bytes per entry), concatenated: bounded memory whatever C."""
    step = _classes_per_chunk(scores.shape[0], bytes_per_entry=120)
    cut = lambda x, i: None if x is None else x[:, i : i + step]
    return torch.cat([fn(scores[:, i : i + step], targets[:, i : i + step], cut(mask, i)) for i in range(0, scores.shape[1], step)])


def classes_without_positives(targets: Tensor) -> list[int]:
    """Indices of the classes with no positive target.

    Their AP is undefined, so macro mAP leaves them out; callers report them with this list.

    Args:
        targets: (N, C) in {0, 1}.

    Returns:
        Sorted class indices.
    """
    if targets.ndim != 2:
        raise ValueError(f"targets must be 2-D (N, C), got shape {tuple(targets.shape)}")
    return torch.nonzero(~targets.bool().any(dim=0)).flatten().tolist()


def average_precision(scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-class average precision, as scikit-learn's `average_precision_score`.

    AP = sum over thresholds of (R_k - R_{k-1}) P_k: step-wise, without interpolation, with tied
    scores forming a single threshold. Equivalently, the mean over positives of the precision at
    that positive's score.

    Args:
        scores: float (N, C), any score increasing with the chance of a positive.
        targets: (N, C) in {0, 1}.
        mask: optional bool (N, C), the annotated entries: AP of each class over those only.

    Returns:
        (C,) AP in the dtype of `scores`; NaN for a class without (annotated) positives.

    Example:
        >>> scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.7], [0.2, 0.2]])
        >>> targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
        >>> average_precision(scores, targets)
        tensor([0.8333, 0.5000])
    """
    return _average_precision(scores, _check_inputs(scores, targets), _check_mask(scores, mask))


def _average_precision(scores: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
    """`average_precision` on validated inputs (bool targets and mask)."""
    if mask is None or bool(mask.all()):        # every entry annotated: the faster exact path
        return _average_precision_full(scores, targets).to(scores.dtype)
    return _by_class_chunks(_masked_ap_chunk, scores, targets, mask).to(scores.dtype)


def _masked_ap_chunk(scores: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
    r = _rank(scores, targets, mask)
    precision_at = r.tp_at / r.count_at.clamp(min=1)  # (N, C) count_at >= 1 wherever positive
    return (r.positive * precision_at).sum(dim=0) / r.num_pos  # (C,) 0/0 = NaN without positives


def mean_average_precision(
    scores: Tensor, targets: Tensor, average: Average = "macro", mask: Tensor | None = None
) -> Tensor:
    """Mean average precision over classes.

    Args:
        scores: float (N, C).
        targets: (N, C) in {0, 1}.
        average: "macro": mean of per-class AP over the classes with at least one positive (see
            `classes_without_positives` for those left out); "micro": AP of all (sample, class)
            pairs pooled, as scikit-learn's average="micro"; None: per-class AP with NaN.
        mask: optional bool (N, C), the annotated entries (micro: the annotated pairs pooled).

    Returns:
        A scalar, or (C,) for average=None, in the dtype of `scores`. NaN when no class has a
        positive.

    Example:
        >>> scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.7, 0.4], [0.3, 0.7, 0.6]])
        >>> targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
        >>> mean_average_precision(scores, targets)  # the third class has no positive
        tensor(0.6667)
        >>> mean_average_precision(scores, targets, average="micro")
        tensor(0.6250)
    """
    _check_average(average, ("macro", "micro", None))
    targets = _check_inputs(scores, targets)  # before flattening, which would hide a shape mismatch
    mask = _check_mask(scores, mask)
    if average == "micro":
        flat_mask = None if mask is None else mask.reshape(-1, 1)
        return _average_precision(scores.reshape(-1, 1), targets.reshape(-1, 1), flat_mask).squeeze(0)
    ap = _average_precision(scores, targets, mask)  # (C,)
    return ap if average is None else ap.nanmean()


def auroc(scores: Tensor, targets: Tensor, average: Literal["macro"] | None = "macro", mask: Tensor | None = None) -> Tensor:
    """Area under the ROC curve per class, as scikit-learn's `roc_auc_score`.

    The probability that a random positive outscores a random negative, a tie counting one half
    (the trapezoid rule on the ROC curve, i.e. the Mann-Whitney U statistic with midranks).

    Args:
        scores: float (N, C).
        targets: (N, C) in {0, 1}.
        average: "macro": mean over the classes having both positives and negatives; None: (C,).
        mask: optional bool (N, C), the annotated entries.

    Returns:
        A scalar or (C,) in the dtype of `scores`; NaN for a class with a single target value.
    """
    _check_average(average, ("macro", None))
    targets = _check_inputs(scores, targets)
    auc = _by_class_chunks(_auroc_chunk, scores, targets, _check_mask(scores, mask)).to(scores.dtype)
    return auc if average is None else auc.nanmean()


def _auroc_chunk(scores: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
    r = _rank(scores, targets, mask)
    num_neg = r.num_counted - r.num_pos  # (C,)
    fp_at = r.count_at - r.tp_at  # (N, C)
    # Negatives a positive beats: those strictly below, plus half of those tied with it.
    wins = num_neg - (r.fp_above + fp_at) / 2  # (N, C)
    return (r.positive * wins).sum(dim=0) / (r.num_pos * num_neg)  # (C,) 0/0 = NaN


def _predict(scores: Tensor, threshold: float | Tensor) -> Tensor:
    """Predictions `scores >= threshold`, bool (N, C); threshold a number, 0-d or (C,)."""
    if isinstance(threshold, Tensor):
        if threshold.shape not in ((), (scores.shape[1],)):
            raise ValueError(
                f"threshold must be a number or have shape ({scores.shape[1]},) = (C,), "
                f"got shape {tuple(threshold.shape)}"
            )
        threshold = threshold.to(scores.device)  # compared in the promoted dtype of the two
        if torch.isnan(threshold).any():
            raise ValueError("threshold contains NaN")
    elif math.isnan(threshold):
        raise ValueError("threshold is NaN")
    return scores >= threshold  # (N, C)


def f1_score(
    scores: Tensor, targets: Tensor, threshold: float | Tensor = 0.5, average: Average = "macro", mask: Tensor | None = None
) -> Tensor:
    """F1 of the predictions `scores >= threshold`, as scikit-learn's `f1_score(zero_division=0)`.

    Args:
        scores: float (N, C).
        targets: (N, C) in {0, 1}.
        threshold: one threshold for all classes, or per-class thresholds (C,) such as those from
            `calibrate_thresholds`.
        average: "macro": mean of per-class F1 over all classes (a class with no positive and no
            prediction counts as 0, as in scikit-learn); "micro": F1 of the pooled counts;
            None: per-class (C,).
        mask: optional bool (N, C), the annotated entries: only those are counted.

    Returns:
        A scalar or (C,) in the dtype of `scores`.
    """
    _check_average(average, ("macro", "micro", None))
    targets = _check_inputs(scores, targets)
    mask = _check_mask(scores, mask)
    pred = _predict(scores, threshold)  # (N, C)
    if mask is not None:
        pred, targets = pred & mask, targets & mask  # an entry not annotated is neither right nor wrong
    tp = (pred & targets).sum(dim=0).to(_COUNT_DTYPE)  # (C,)
    wrong = (pred ^ targets).sum(dim=0).to(_COUNT_DTYPE)  # (C,) false positives + false negatives
    if average == "micro":
        tp, wrong = tp.sum(), wrong.sum()
    denom = 2 * tp + wrong
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), 0.0).to(scores.dtype)
    return f1.mean() if average == "macro" else f1


def hamming_loss(scores: Tensor, targets: Tensor, threshold: float | Tensor = 0.5, mask: Tensor | None = None) -> Tensor:
    """Fraction of wrong (sample, class) predictions `scores >= threshold`.

    Equals scikit-learn's `hamming_loss` on the thresholded predictions.

    Args:
        scores: float (N, C).
        targets: (N, C) in {0, 1}.
        threshold: a number, or per-class thresholds (C,).
        mask: optional bool (N, C): the fraction over the annotated entries only.

    Returns:
        A scalar in the dtype of `scores` (NaN when no entry is annotated).
    """
    targets = _check_inputs(scores, targets)
    mask = _check_mask(scores, mask)
    wrong = _predict(scores, threshold) ^ targets  # (N, C)
    if mask is None:
        return wrong.to(_COUNT_DTYPE).mean().to(scores.dtype)
    return ((wrong & mask).sum().to(_COUNT_DTYPE) / mask.sum()).to(scores.dtype)


def calibrate_thresholds(scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-class thresholds maximising each class's F1 on the given (validation) data.

    Every distinct score of a class is a candidate; F1 at all of them comes from one sort. The
    returned threshold lies halfway between the best score and the next lower distinct score, so
    it selects the same samples here and sits in the gap rather than on a validation sample when
    applied to test data. When several thresholds reach the best F1 the highest is kept (fewest
    predictions); when the best predicts every sample the threshold is the lowest score itself.

    A class without any positive has F1 = 0 whatever the threshold; it gets +inf, so it predicts
    nothing (only a score of +inf reaches it). That is what every threshold-based metric prefers
    on data without positives, and it keeps predicting nothing on new data rather than depending
    on where the validation scores happened to end. Note that +inf is not valid strict JSON.

    Args:
        scores: float (N, C).
        targets: (N, C) in {0, 1}.
        mask: optional bool (N, C): F1 of each class on its annotated entries only.

    Returns:
        (C,) thresholds in the dtype of `scores`, to use as `scores >= thresholds`.

    Example:
        >>> scores = torch.tensor(
        ...     [[0.9, 0.1, 0.3], [0.8, 0.7, 0.6], [0.3, 0.7, 0.2], [0.2, 0.2, 0.1]]
        ... )
        >>> targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
        >>> calibrate_thresholds(scores, targets)
        tensor([0.2500, 0.1500,    inf])
    """
    targets = _check_inputs(scores, targets)
    return _by_class_chunks(_thresholds_chunk, scores, targets, _check_mask(scores, mask))


def _thresholds_chunk(scores: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
    r = _rank(scores, targets, mask)
    n = scores.shape[0]
    # Thresholding at the k-th score predicts count_at (annotated) samples: F1 = 2 TP / (pred + pos).
    f1 = 2 * r.tp_at / (r.count_at + r.num_pos).clamp(min=1)  # (N, C)
    best = f1.argmax(dim=0, keepdim=True)  # (1, C) first = highest-scored maximiser
    end = r.block_end.gather(0, best)  # (1, C)
    chosen = r.sorted_scores.gather(0, best).squeeze(0)  # (C,)
    lower = r.sorted_scores.gather(0, (end + 1).clamp(max=n - 1)).squeeze(0)  # (C,)
    # a/2 + b/2 cannot overflow and never exceeds a, but for adjacent floats it may round down
    # onto b, which would also select b's samples: keep a itself then.
    mid = chosen / 2 + lower / 2  # (C,)
    in_gap = (end.squeeze(0) < n - 1) & (mid > lower)  # (C,)
    thresholds = torch.where(in_gap, mid, chosen)  # (C,)
    return torch.where(r.num_pos > 0, thresholds, torch.inf)


def multilabel_metrics(
    scores: Tensor, targets: Tensor, threshold: float = 0.5, thresholds: Tensor | None = None, mask: Tensor | None = None
) -> dict[str, float]:
    """The evaluation summary written to metrics.json.

    Args:
        scores: float (N, C) probabilities in [0, 1] (apply `torch.sigmoid` to logits first: the
            fixed `threshold` assumes probabilities).
        targets: (N, C) in {0, 1}, the full ground truth.
        threshold: one threshold for `f1_*` and `hamming`.
        thresholds: optional per-class (C,) thresholds, typically `calibrate_thresholds` on a
            validation split; adds the `*_calibrated` entries.
        mask: optional bool (N, C), the annotated entries: every metric on those only.

    Returns:
        `mAP_macro` (over classes with a positive), `mAP_micro`, `auroc_macro` (over classes with
        both target values), `f1_macro`, `f1_micro`, `hamming`, and with `thresholds` also
        `f1_macro_calibrated`, `f1_micro_calibrated`, `hamming_calibrated`. A value is NaN when
        undefined (e.g. AUROC when no class has both target values).
    """
    _check_inputs(scores, targets)
    if ((scores < 0) | (scores > 1)).any():
        raise ValueError("scores must be probabilities in [0, 1]; apply torch.sigmoid to logits")
    m = _check_mask(scores, mask)
    summary = {
        "mAP_macro": mean_average_precision(scores, targets, "macro", m),
        "mAP_micro": mean_average_precision(scores, targets, "micro", m),
        "auroc_macro": auroc(scores, targets, "macro", m),
        "f1_macro": f1_score(scores, targets, threshold, "macro", m),
        "f1_micro": f1_score(scores, targets, threshold, "micro", m),
        "hamming": hamming_loss(scores, targets, threshold, m),
    }
    if thresholds is not None:
        summary |= {
            "f1_macro_calibrated": f1_score(scores, targets, thresholds, "macro", m),
            "f1_micro_calibrated": f1_score(scores, targets, thresholds, "micro", m),
            "hamming_calibrated": hamming_loss(scores, targets, thresholds, m),
        }
    return {name: value.item() for name, value in summary.items()}


# ---------------------------------------------------------------------------------------------
# Exclusive groups with an unknown class. A group with K classes is scored per image by a
# predicted class `pred` (N,) in 0..K (K = unknown) and a score of "unknown"; the truth `true`
# (N,) is the class, or K when the group does not apply to the image (or it shows none of the
# classes). See `mlml.groups` for decoding and for the truth from full labels.
# ---------------------------------------------------------------------------------------------


def _check_group(pred: Tensor, true: Tensor, num_classes: int) -> None:
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} must be equal 1-D shapes")
    for name, x in (("pred", pred), ("true", true)):
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > num_classes):
            raise ValueError(f"{name} must hold classes in 0..{num_classes} ({num_classes} = unknown)")


def group_accuracy(class_scores: Tensor, true: Tensor) -> Tensor:
    """Accuracy of the top class on the images the group applies to (true < K), whatever the
    unknown score: how well the classes are told apart, comparable across heads and calibrations.

    Args:
        class_scores: float (N, K) scores of the group's K classes (the unknown score left out).
        true: long (N,) in 0..K.

    >>> group_accuracy(torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.6, 0.4]]), torch.tensor([0, 1, 2]))
    tensor(1.)

    Returns:
        A float scalar; NaN when no image has a class.
    """
    K = class_scores.shape[1]
    _check_group(true, true, K)
    applies = true < K
    pred = class_scores.argmax(1)
    return (pred[applies] == true[applies]).float().mean() if applies.any() else torch.tensor(math.nan)


def decoded_accuracy(pred: Tensor, true: Tensor, num_classes: int) -> Tensor:
    """Share of all images whose decoded prediction (a class, or K = unknown) is right.

    >>> decoded_accuracy(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1, 1, 2]), num_classes=2)
    tensor(0.7500)
    """
    _check_group(pred, true, num_classes)
    return (pred == true).float().mean()


def unknown_accuracy(pred: Tensor, true: Tensor, num_classes: int) -> Tensor:
    """Fraction of the images the group does not apply to (true == K) that are predicted unknown.

    >>> unknown_accuracy(torch.tensor([0, 2, 1, 2]), torch.tensor([2, 1, 1, 2]), num_classes=2)
    tensor(0.5000)
    """
    _check_group(pred, true, num_classes)
    none = true == num_classes
    return (pred[none] == num_classes).float().mean() if none.any() else torch.tensor(math.nan)


def unknown_auroc(unknown_score: Tensor, true: Tensor, num_classes: int) -> Tensor:
    """AUROC of detecting the images the group does not apply to (true == K) by `unknown_score` (N,).

    >>> unknown_auroc(torch.tensor([0.9, 0.2, 0.4, 0.6]), torch.tensor([2, 0, 1, 2]), num_classes=2)
    tensor(1.)

    Returns:
        A scalar in the dtype of the score; NaN unless both kinds of images occur.
    """
    _check_group(true, true, num_classes)
    if unknown_score.shape != true.shape:
        raise ValueError(f"unknown_score {tuple(unknown_score.shape)} and true {tuple(true.shape)} differ")
    return auroc(unknown_score[:, None], (true == num_classes)[:, None], average=None)[0]
