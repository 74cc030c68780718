"""Inference from a checkpoint alone: no training data, no config file, only the checkpoint and images.

A checkpoint's `inference` entry holds what inference needs, as plain types (loadable with
`weights_only=True`):

    model         the model config (backbone, head, ...; mlml.config.ModelConfig as a dict)
    label_space   label names and groups (LabelSpace.to_dict)
    image_size    images are decoded to (3, S, S), centre square (mlml.data.image_files.decode_image)
    mean, std     the normalisation the model applies to [0, 1] images (it does so itself)
    threshold     the fixed threshold (eval.threshold; group decoding of sigmoid heads)
    thresholds    float (C,) per-class thresholds calibrated on validation, or None
    state_dict    the weights of the model tables report when it is not the checkpoint's `model`
                  (a mean teacher's EMA model), else None

The trainer writes it into every checkpoint and, at the end of training (`Trainer.finish`), rewrites
`best.pt` atomically with the calibrated thresholds added: best.pt is the file users copy, so a
sidecar file would be lost on the way. `load_predictor` rebuilds the model from it; the CLI
(`mlml predict`, `mlml eval`) and the scripts in `experiments/` share it. Thresholded labels are
`probability >= threshold` per class (calibrated thresholds where the checkpoint has them);
exclusive groups are decoded to a class or unknown (`mlml.groups.decode_groups`).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mlml.checkpoint import load_checkpoint
from mlml.config import ModelConfig, from_dict
from mlml.data.image_files import IMAGE_SUFFIXES, UnreadableImageError, decode_image
from mlml.groups import decode_groups
from mlml.labels import LabelSpace
from mlml.models import build_model
from mlml.models.model import MEAN, STD


def inference_metadata(model_cfg: dict, label_space: LabelSpace, image_size: int, threshold: float,
                       thresholds: torch.Tensor | None = None, state_dict: dict | None = None) -> dict:
    """The checkpoint's `inference` entry (see the module doc), plain types only."""
    return {
        "model": dict(model_cfg),
        "label_space": label_space.to_dict(),
        "image_size": int(image_size),
        "mean": list(MEAN),
        "std": list(STD),
        "threshold": float(threshold),
        "thresholds": None if thresholds is None else thresholds.detach().float().cpu().clone(),
        "state_dict": state_dict,
    }


def legacy_metadata(ckpt: dict) -> dict:
    """The `inference` entry of a checkpoint written before it existed (no calibrated thresholds)."""
    cfg = ckpt["config"]
    data = cfg["data"]
    size = data.get("synthetic", {}).get("image_size", 32) if data.get("source", "synthetic") == "synthetic" else data.get("image_size", 64)
    return inference_metadata(cfg["model"], LabelSpace.from_dict(ckpt["label_space"]), size, cfg.get("eval", {}).get("threshold", 0.5))


@dataclass
class Predictor:
    """A model rebuilt from a checkpoint, with what it needs to turn images into labels."""

    model: nn.Module
    label_space: LabelSpace
    image_size: int
    threshold: float                # fixed threshold (and group decoding of sigmoid heads)
    thresholds: torch.Tensor        # float (C,) applied per class: calibrated, else the fixed one
    calibrated: bool
    config: dict                    # the training run's config, as a dict
    device: torch.device

    @property
    def softmax_groups(self) -> dict[str, bool]:
        return dict(getattr(getattr(self.model, "head", None), "softmax_groups", {}))

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, C) label probabilities of uint8 (B, 3, S, S) images, on the CPU."""
        return torch.sigmoid(self.model(images.to(self.device))["logits"].float()).cpu()

    def decode(self, probs: torch.Tensor, top: int = 5) -> list[dict]:
        """Per image: thresholded `labels`, the `top` labels with probabilities, and each exclusive group's class or unknown."""
        names = self.label_space.names
        chosen = probs >= self.thresholds                                          # (B, C)
        groups = decode_groups(probs, self.label_space, self.softmax_groups, self.threshold)
        out = []
        for i in range(len(probs)):
            order = probs[i].argsort(descending=True)[:top].tolist()
            record = {"labels": [names[c] for c in torch.nonzero(chosen[i]).flatten().tolist()],
                      "top": [{"label": names[c], "probability": round(float(probs[i, c]), 4)} for c in order], "groups": {}}
            for name, dec in groups.items():
                k, labels = int(dec.pred[i]), self.label_space.group(name).labels
                record["groups"][name] = {"class": names[labels[k]] if k < len(labels) else "unknown",
                                          "probability": round(float(dec.probs[i, k]), 4)}
            out.append(record)
        return out


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def load_predictor(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """The model of a checkpoint, rebuilt from the checkpoint alone (no data, no config file)."""
    ckpt = load_checkpoint(path)
    meta = ckpt.get("inference") or legacy_metadata(ckpt)
    space = LabelSpace.from_dict(meta["label_space"])
    model_cfg = from_dict(ModelConfig, meta["model"])
    model_cfg.weights = ""                                   # the checkpoint carries the weights
    model = build_model(model_cfg, space)
    model.load_state_dict(meta.get("state_dict") or ckpt["model"])
    device = resolve_device(device) if isinstance(device, str) else device
    thresholds = meta.get("thresholds")
    fixed = torch.full((space.num_labels,), float(meta["threshold"]))
    return Predictor(model.to(device).eval(), space, int(meta["image_size"]), float(meta["threshold"]),
                     fixed if thresholds is None else torch.as_tensor(thresholds).float(), thresholds is not None,
                     ckpt["config"], device)


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the image files below each folder given (sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(item)
    return files


class _Files(Dataset):
    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, decode_image(self.files[i], self.size), ""        # as training images: centre square, resized
        except UnreadableImageError as err:
            return i, None, str(err)


def _collate(items: list) -> list:
    return items


def predict_files(predictor: Predictor, files: list[Path], batch_size: int = 64, workers: int = 0, top: int = 5,
                  progress: bool = True) -> Iterator[dict]:
    """One record per file, in order: `image`, then `labels`, `top`, `groups` (see `Predictor.decode`) or `error`.

    An unreadable file gives a record with its `error` (and a line on stderr); the others go on.
    """
    loader = DataLoader(_Files(files, predictor.image_size), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    for items in tqdm(loader, desc="predict", unit="batch", disable=not progress or None, file=sys.stderr):
        readable = [(i, image) for i, image, _ in items if image is not None]
        records = predictor.decode(predictor.probabilities(torch.stack([im for _, im in readable])), top) if readable else []
        decoded = {i: r for (i, _), r in zip(readable, records)}
        for i, _, error in items:
            if error:
                print(f"skipped: {error}", file=sys.stderr)
                yield {"image": str(files[i]), "error": error}
            else:
                yield {"image": str(files[i]), **decoded[i]}


def write_predictions(records: Iterable[dict], out: Path, label_space: LabelSpace) -> int:
    """Write records to `out`: `.jsonl` (one object per image) or `.csv` (image, labels, error, one column per exclusive group)."""
    if out.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"--out must end in .jsonl or .csv, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    groups = [g.name for g in label_space.groups if g.exclusive]
    with open(out, "w", newline="") as f:
        if out.suffix == ".jsonl":
            for r in records:
                f.write(json.dumps(r) + "\n")
                count += 1
        else:
            writer = csv.writer(f)
            writer.writerow(["image", "labels", "error", *groups])
            for r in records:
                writer.writerow([r["image"], ";".join(r.get("labels", [])), r.get("error", ""),
                                 *(r.get("groups", {}).get(g, {}).get("class", "") for g in groups)])
                count += 1
    return count


def evaluate_checkpoint(path: str | Path, split: str = "test", overrides: Iterable[str] = (), device: str = "cpu",
                        predictions: Path | None = None) -> dict[str, float]:
    """The metrics of a checkpoint's model on a split of its run's data (`overrides`: data keys moved, e.g. data.coco.root=...).

    Only the evaluated split's images are loaded (and validation's, to calibrate thresholds, for a
    checkpoint without calibrated ones). `predictions`: also write each image's record (as
    `mlml predict` does, with the same thresholds) to a .jsonl or .csv file.
    """
    from mlml.config import Config, merge, parse_override
    from mlml.data.pipeline import build_data
    from mlml.evaluation import calibrate_thresholds, group_metrics, predict, split_metrics
    from mlml.settings import upgrade_stored_config

    predictor = load_predictor(path, device)
    raw = upgrade_stored_config(json.loads(json.dumps(predictor.config)))   # a copy, spelled as today
    for text in overrides:
        merge(raw, *parse_override(text))
    cfg = from_dict(Config, raw)
    data = build_data(cfg.data, cache=(split,) if predictor.calibrated else ("val", split))
    if data.label_space.names != predictor.label_space.names:
        raise ValueError(f"the data's labels {data.label_space.names[:5]}... are not the checkpoint's {predictor.label_space.names[:5]}...")

    def run(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        stats: dict = {}
        loader = data.loader(name, {"image": "none"}, cfg.run.seed, batch_size=256)
        scores, targets, observed = predict(predictor.model, loader, predictor.device, stats=stats, masked=True)
        return scores, targets, observed if data.annotated(name) else None, data.splits[name][stats["positions"].numpy()]

    scores, targets, mask, rows = run(split)
    thresholds = predictor.thresholds if predictor.calibrated else calibrate_thresholds(*run("val")[:3])
    metrics = split_metrics(scores, targets, cfg.eval.threshold, thresholds, mask, cfg.eval.min_positives)
    if mask is None and (split == "test" or cfg.data.val_labels == "full"):
        metrics |= group_metrics(scores, targets, data.label_space, predictor.softmax_groups, cfg.eval.threshold)
    if predictions is not None:
        if not predictor.calibrated:
            predictor.thresholds = thresholds
        source = data.source
        names = [str(source.path(int(r))) if hasattr(source, "path") else f"row {int(r)}" for r in rows]
        write_predictions(({"image": n, **r} for n, r in zip(names, predictor.decode(scores))), predictions, predictor.label_space)
    return metrics
