"""Evaluation: predictions over a loader (sharded across ranks, gathered) and the metrics of a split.

Test metrics are against full labels, or, where the labels are partial (`data.eval_labels =
"annotated"`: known negatives listed, as Open Images), against each class's annotated entries only
(a mask), over the classes with at least `eval.min_positives` annotated positives; the others are
reported apart. Per-class thresholds are calibrated on validation predictions (on the same
entries) and applied unchanged to test predictions.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from mlml.distributed import all_gather_cat, is_distributed
from mlml.groups import decode_groups, group_targets
from mlml.labels import Group, LabelSpace
from mlml.metrics import (
    calibrate_thresholds, classes_without_positives, decoded_accuracy, group_accuracy, mean_average_precision, multilabel_metrics,
    unknown_accuracy, unknown_auroc,
)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None, stats: dict | None = None,
            masked: bool = False) -> tuple[torch.Tensor, ...]:
    """Sigmoid scores and targets of a whole split, in dataset order, on the CPU (and, `masked`, the
    bool (N, C) mask of the labels the split's observation model knows: the annotated entries).

    Each rank predicts its shard; under torch.distributed the shards are gathered and the
    sampler's padding duplicates dropped by dataset index, so every rank gets the scores a single
    process would compute on the same weights. Images that could not be read are left out (the
    rows returned are the readable images, in order); their count is added to
    `stats["skipped_images"]` when `stats` is given, and `stats["positions"]` holds the dataset
    positions of the rows returned.
    """
    was_training = model.training
    model.eval()
    scores, targets, index, observed = [], [], [], []
    for batch in loader:
        if stats is not None:
            stats["skipped_images"] = stats.get("skipped_images", 0) + int(batch.get("skipped", 0))
        if batch["index"].numel() == 0:
            continue
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(batch["image"].to(device, non_blocking=True))["logits"]
        scores.append(torch.sigmoid(logits.float()).cpu())
        targets.append(batch["targets"])
        index.append(batch["index"])
        observed.append(batch["observed"])
    model.train(was_training)
    if not scores:
        raise RuntimeError(f"no readable image in a split of {len(loader.dataset)} images")
    s, t, i, m = torch.cat(scores), torch.cat(targets), torch.cat(index), torch.cat(observed)
    if is_distributed():   # nccl gathers CUDA tensors, gloo CPU ones
        s, t, i, m = (all_gather_cat(x.to(device)).cpu() for x in (s, t, i, m.to(torch.uint8)))   # bool as uint8 for every backend
        m = m.bool()
    n = len(loader.dataset)
    out_s, out_t, out_m = torch.empty(n, s.shape[1]), torch.empty(n, t.shape[1]), torch.empty(n, m.shape[1], dtype=torch.bool)
    covered = torch.zeros(n, dtype=torch.bool)
    out_s[i], out_t[i], out_m[i], covered[i] = s, t, m, True   # duplicates carry identical values
    if stats is not None:
        stats["positions"] = torch.nonzero(covered).flatten()
    return (out_s[covered], out_t[covered], out_m[covered]) if masked else (out_s[covered], out_t[covered])


def split_metrics(scores: torch.Tensor, targets: torch.Tensor, threshold: float, thresholds: torch.Tensor | None,
                  mask: torch.Tensor | None = None, min_positives: int = 1) -> dict[str, float]:
    """The multi-label metric summary of one split (NaN-free keys only).

    With `mask` (bool (N, C), the annotated entries) every metric uses each class's annotated
    entries, over the classes with at least `min_positives` annotated positives; the others are
    reported apart: `classes_evaluated`, `classes_few_positives` and, where they have any
    positive, `mAP_macro_few_positives`.
    """
    if mask is None:
        metrics = multilabel_metrics(scores, targets, threshold=threshold, thresholds=thresholds)
    else:
        few = torch.zeros(targets.shape[1], dtype=torch.bool)
        few[few_positive_classes(targets, mask, min_positives)] = True
        keep = ~few
        metrics = {"classes_evaluated": float(keep.sum()), "classes_few_positives": float(few.sum())}
        if keep.any():
            metrics |= multilabel_metrics(scores[:, keep], targets[:, keep], threshold,
                                          None if thresholds is None else thresholds[keep], mask[:, keep])
        if few.any():
            metrics["mAP_macro_few_positives"] = float(mean_average_precision(scores[:, few], targets[:, few], "macro", mask[:, few]))
    return {k: float(v) for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}


def few_positive_classes(targets: torch.Tensor, mask: torch.Tensor, min_positives: int) -> list[int]:
    """Classes with fewer than `min_positives` annotated positives (reported apart from the others)."""
    return torch.nonzero((targets.bool() & mask).sum(0) < min_positives).flatten().tolist()


def softmax_groups(model: nn.Module) -> dict[str, bool]:
    """Exclusive groups the model scores with one softmax (name -> has an unknown output); {} for sigmoid heads."""
    return dict(getattr(getattr(model, "head", None), "softmax_groups", {}))


def group_metrics(scores: torch.Tensor, targets: torch.Tensor, space: LabelSpace, softmax: dict[str, bool], threshold: float = 0.5) -> dict[str, float]:
    """Per exclusive group, against full labels: `group_acc/<g>` (top class on the images the
    group applies to), `decoded_acc/<g>` (the decoded class-or-unknown right, over all images),
    and where some images have no class of g, `unknown_acc/<g>` (predicted unknown on those) and
    `unknown_auroc/<g>` (their detection by the unknown score).

    Args:
        scores: float (N, C) per-label probabilities of any head (`mlml.groups.decode_groups`).
        targets: (N, C) full labels.
        softmax: `softmax_groups(model)`.
    """
    truth = group_targets(targets.float(), torch.ones_like(targets, dtype=torch.bool), space)
    out = {}
    for name, dec in decode_groups(scores, space, softmax, threshold).items():
        true, K = truth[name].cls, dec.probs.shape[1] - 1
        out[f"group_acc/{name}"] = float(group_accuracy(dec.probs[:, :K], true))
        out[f"decoded_acc/{name}"] = float(decoded_accuracy(dec.pred, true, K))
        if (true == K).any():
            out[f"unknown_acc/{name}"] = float(unknown_accuracy(dec.pred, true, K))
            out[f"unknown_auroc/{name}"] = float(unknown_auroc(dec.probs[:, K], true, K))
    return {k: v for k, v in out.items() if not math.isnan(v)}


def split_metric_names() -> list[str]:
    """The keys `split_metrics` reports (without calibrated thresholds), read off a two-image
    example, so the list cannot drift from the metrics."""
    return list(_example_metric_names()[0])


def group_metric_kinds() -> list[str]:
    """The `<kind>` of each `<kind>/<group>` key of `group_metrics`, read off an example group
    where one image shows none of the classes (so the unknown metrics appear too)."""
    return list(_example_metric_names()[1])


@functools.cache
def _example_metric_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    split = split_metrics(torch.tensor([[0.2], [0.8]]), torch.tensor([[0.0], [1.0]]), 0.5, None)
    space = LabelSpace(("a", "b"), (Group("g", (0, 1), exclusive=True),))
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    groups = group_metrics(torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.1, 0.2]]), targets, space, {})
    return tuple(sorted(split)), tuple(sorted(k.split("/")[0] for k in groups))


def validation_metric_names(model_names: list[str], space: LabelSpace | None, full_labels: bool) -> list[str]:
    """Every key `Trainer.validate` can record: `val/<metric>` for the first evaluated model,
    `val_<name>/<metric>` for the others; group metrics only with full validation labels, for
    the exclusive groups of `space` (any group name when `space` is None)."""
    metrics = split_metric_names()
    if full_labels:
        groups = [g.name for g in space.groups if g.exclusive] if space is not None else ["<group>"]
        metrics += [f"{kind}/{g}" for g in groups for kind in group_metric_kinds()]
    prefixes = ["val"] + [f"val_{name}" for name in model_names[1:]]
    return [f"{p}/{m}" for p in prefixes for m in metrics]


def check_selection(select: str, full_labels: bool, model_names: list[str] | None = None, space: LabelSpace | None = None) -> None:
    """Raise `ConfigError` unless `eval.select` names a validation metric.

    At load time (`model_names`, `space` None) only the form is known: `val/<metric>` or
    `val_<model>/<metric>`, a metric `split_metrics` reports or `<kind>/<group>` of `group_metrics`
    (with full validation labels). Once the method and data are built, the exact names.
    """
    from mlml.config import ConfigError

    if model_names is not None and space is not None:
        known = validation_metric_names(model_names, space, full_labels)
        ok = select in known
    else:
        prefix, _, metric = select.partition("/")
        kind, _, group = metric.partition("/")
        valid_prefix = prefix == "val" or (prefix.startswith("val_") and len(prefix) > 4)
        ok = valid_prefix and (metric in split_metric_names() or (full_labels and bool(group) and kind in group_metric_kinds()))
        groups = f", or <kind>/<group> with <kind> one of {', '.join(group_metric_kinds())}" if full_labels else ""
        known = [f"val/<metric> or val_<model>/<metric> with <metric> one of {', '.join(split_metric_names())}{groups}"]
    if not ok:
        why = "" if full_labels else " (group metrics need data.val_labels = 'full')"
        raise ConfigError(f"config key 'eval.select' = {select!r} is not a validation metric{why}; known: {'; '.join(known)}", "eval.select")


def per_class_ap(scores: torch.Tensor, targets: torch.Tensor, names: tuple[str, ...], mask: torch.Tensor | None = None) -> dict[str, float | None]:
    """Label name -> AP (None for a label without positives in this split); on the annotated entries with `mask`."""
    ap = mean_average_precision(scores, targets, average=None, mask=mask)
    return {name: (None if math.isnan(v) else float(v)) for name, v in zip(names, ap.tolist())}


__all__ = ["predict", "split_metrics", "split_metric_names", "validation_metric_names", "check_selection", "group_metrics", "softmax_groups", "per_class_ap", "calibrate_thresholds", "classes_without_positives",
           "few_positive_classes"]
