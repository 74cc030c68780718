"""Evaluation: predictions over a loader (sharded across ranks, gathered) and the metrics of a split.

Test metrics are always against full labels. Per-class thresholds are calibrated on validation
predictions and applied unchanged to test predictions.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from mlml.metrics import calibrate_thresholds, classes_without_positives, mean_average_precision, multilabel_metrics


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None, stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores and targets of a whole split, in dataset order, on the CPU.

    Each rank predicts its shard; under torch.distributed the shards are gathered and the
    sampler's padding duplicates dropped by dataset index. Images that could not be read are left
    out (the rows returned are the readable images, in order); their count is added to
    `stats["skipped_images"]` when `stats` is given.
    """
    was_training = model.training
    model.eval()
    scores, targets, index = [], [], []
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
    model.train(was_training)
    if not scores:
        raise RuntimeError(f"no readable image in a split of {len(loader.dataset)} images")
    s, t, i = torch.cat(scores), torch.cat(targets), torch.cat(index)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        s, t, i = gather(s, device), gather(t, device), gather(i, device)
    n = len(loader.dataset)
    out_s, out_t = torch.empty(n, s.shape[1]), torch.empty(n, t.shape[1])
    covered = torch.zeros(n, dtype=torch.bool)
    out_s[i], out_t[i], covered[i] = s, t, True   # duplicates carry identical values
    return out_s[covered], out_t[covered]


def gather(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate per-rank tensors (sizes may differ along dim 0) on every rank (CPU result)."""
    world = dist.get_world_size()
    size = torch.tensor([len(x)], device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(sizes).item())
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: len(x)] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(k.item())].cpu() for p, k in zip(parts, sizes)])


def split_metrics(scores: torch.Tensor, targets: torch.Tensor, threshold: float, thresholds: torch.Tensor | None) -> dict[str, float]:
    """The multi-label metric summary of one split (NaN-free keys only)."""
    metrics = multilabel_metrics(scores, targets, threshold=threshold, thresholds=thresholds)
    return {k: float(v) for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}


def per_class_ap(scores: torch.Tensor, targets: torch.Tensor, names: tuple[str, ...]) -> dict[str, float | None]:
    """Label name -> AP (None for a label without positives in this split)."""
    ap = mean_average_precision(scores, targets, average=None)
    return {name: (None if math.isnan(v) else float(v)) for name, v in zip(names, ap.tolist())}


__all__ = ["predict", "split_metrics", "per_class_ap", "calibrate_thresholds", "classes_without_positives"]
