"""Colour plus object from any image folder: every image recoloured to one of K colour classes.

`RecolourSource` wraps a source (an ImageNet folder, any folder of photos, an annotation file)
and gives image i a colour class drawn from a hash of (seed, i), the same every run and on every
worker. The image is tinted to that colour: every pixel takes the class hue (jittered by up to
±6° per image), saturation is raised to at least 0.45 and value to at least 0.15, so luminance
(shapes, texture) is kept and the class colour is the dominant one. The label space is a new
exclusive group `colour` (labels 0..K-1) followed by the wrapped source's groups (`object` for a
folder): the two-group multi-task data for studying exclusive groups. The colour label is stored
as a positive (no colour negatives, so `annotated` observes it like the folder's class).

Colour classes, in order, hues far apart (>= 43° for the first 6): red, yellow, green, cyan,
blue, purple, then orange and magenta. Their names get a `colour:` prefix if the wrapped source
already uses one of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mlml.data.label_store import LabelStore, LabelStoreBuilder, row_chunk
from mlml.data.observation import hash_uniform
from mlml.labels import Group, LabelSpace
from mlml.settings import must

HUES: dict[str, float] = {
    "red": 0.0, "yellow": 58.0, "green": 120.0, "cyan": 182.0,
    "blue": 225.0, "purple": 275.0, "orange": 30.0, "magenta": 320.0,
}
_CHUNK = 1 << 18


def recolour(image: torch.Tensor, hue: float | np.ndarray) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, H, W) tinted to `hue` (degrees), luminance kept.

    Or a batch: uint8 (B, 3, H, W) with `hue` (B,), equal to recolouring the images one by one."""
    rgb = image.float() / 255
    v = rgb.amax(-3, keepdim=True)                                     # (..., 1, H, W)
    s = (v - rgb.amin(-3, keepdim=True)) / v.clamp_min(1e-6)
    s, v = 0.45 + 0.55 * s, 0.15 + 0.85 * v
    shift = torch.tensor(np.asarray(hue, dtype=np.float64) / 60.0, dtype=torch.float32)   # () or (B,): one hue per image
    k = (torch.tensor([5.0, 3.0, 1.0]) + shift[..., None]) % 6.0            # (..., 3)
    out = v - v * s * (torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))[..., None, None]
    return (out * 255).round().clamp(0, 255).to(torch.uint8)


def dominant_hue(image: torch.Tensor, bins: int = 72) -> float:
    """Centre (degrees) of the hue histogram bin with the most saturation x value weight."""
    rgb = image.float() / 255
    v, mn = rgb.amax(0), rgb.amin(0)
    c = v - mn
    r, g, b = rgb
    safe = c.clamp_min(1e-6)
    h = torch.where(v == r, ((g - b) / safe) % 6, torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    weight = (c * v).flatten()                                         # saturated bright pixels count most
    hist = torch.zeros(bins).index_add_(0, (h.flatten() / 360 * bins).long().clamp(0, bins - 1), weight)
    return (int(hist.argmax()) + 0.5) * 360 / bins


def nearest_colour(hue: float, colours: int) -> int:
    """Index of the colour class (of the first `colours`) whose hue is nearest to `hue`."""
    hues = np.array(list(HUES.values())[:colours])
    d = np.abs((hues - hue + 180) % 360 - 180)
    return int(d.argmin())


@dataclass
class RecolourSettings:
    """`[data.recolour]`: which source to recolour (its own table gives its files) and into how many colours."""

    source: str = "folder"        # the source whose images are recoloured, e.g. folder or annotations
    colours: int = 6              # K colour classes (1 to 8)

    def __post_init__(self) -> None:
        must(self.source not in ("recolour", "mixed"), "source", "a source other than recolour and mixed", self.source)
        must(1 <= self.colours <= len(HUES), "colours", f"in [1, {len(HUES)}]", self.colours)

    def members(self) -> list[str]:
        return [self.source]


class RecolourSource:
    """`inner`'s images, each tinted to one of `colours` colour classes, with a colour group added.

    Args:
        inner: any source (see `mlml.data.pipeline`).
        colours: K, the number of colour classes (1 to 8).
        seed: fixes each image's colour class and hue jitter.
    """

    def __init__(self, inner: Any, colours: int, seed: int) -> None:
        if not 1 <= colours <= len(HUES):
            raise ValueError(f"data.recolour.colours = {colours} is out of range [1, {len(HUES)}]")
        self.inner, self.colours, self.seed = inner, colours, seed
        rows = np.arange(len(inner))
        self.colour = np.minimum((hash_uniform(seed, 11, rows) * colours).astype(np.int64), colours - 1)
        self.hue = (np.array(list(HUES.values()))[self.colour] + 12.0 * hash_uniform(seed, 12, rows) - 6.0) % 360
        names = list(HUES)[:colours]
        if set(names) & set(inner.label_space.names):
            names = [f"colour:{n}" for n in names]
        groups = [Group("colour", tuple(range(colours)), exclusive=True)] + [
            Group(g.name, tuple(i + colours for i in g.labels), g.exclusive, g.has_unknown, tuple(i + colours for i in g.applies_to))
            for g in inner.label_space.groups
        ]
        self.label_space = LabelSpace(tuple(names) + inner.label_space.names, tuple(groups))
        self.labels = self._build_labels()
        self.default_observation = getattr(inner, "default_observation", "single_positive")
        self.image_size = getattr(inner, "image_size", None)
        if hasattr(inner, "splits"):
            self.splits = inner.splits
        self.fixed_splits = getattr(inner, "fixed_splits", None)

    def __len__(self) -> int:
        return len(self.inner)

    def image(self, i: int) -> torch.Tensor:
        return recolour(self.inner.image(i), float(self.hue[i]))

    def _chunks(self) -> Iterator[tuple[np.ndarray, ...]]:
        """(lengths, indices, neg_lengths, neg_indices) of consecutive rows: colour first, then inner + K.

        Sparse throughout (no dense (rows, C) block), so it scales to millions of images."""
        store, K = self.inner.labels, self.colours
        for start in range(0, len(self), _CHUNK):
            rows = np.arange(start, min(len(self), start + _CHUNK))
            lengths, inner = row_chunk(store.indptr, store.indices, rows)
            lengths = lengths + 1
            first = np.cumsum(lengths) - lengths                         # where each row starts
            indices = np.empty(int(lengths.sum()), dtype=np.int64)
            indices[first] = self.colour[rows]
            rest = np.ones(len(indices), dtype=bool)
            rest[first] = False
            indices[rest] = inner.astype(np.int64) + K                   # stays sorted within rows
            neg_lengths, neg = row_chunk(store.neg_indptr, store.neg_indices, rows)
            if neg_lengths is None:
                neg_lengths, neg = np.zeros(len(rows), dtype=np.int64), np.zeros(0, dtype=np.int64)
            yield lengths, indices, neg_lengths, neg.astype(np.int64) + K

    def _build_labels(self) -> LabelStore:
        """On disk beside the wrapped source's index when it has one, else in memory."""
        inner_store = getattr(self.inner, "store", None)
        if inner_store is None:
            with tempfile.TemporaryDirectory(prefix="mlml-recolour-") as tmp:
                return self._write_labels(Path(tmp)).in_memory()
        path = Path(inner_store) / f"recolour-k{self.colours}-seed{self.seed}"
        if not (path / "meta.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=inner_store))
            try:
                self._write_labels(tmp)
                os.replace(tmp, path)
            except OSError:
                if not (path / "meta.json").exists():       # not a lost race with another rank
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return LabelStore.open(path)

    def _write_labels(self, path: Path) -> LabelStore:
        builder = LabelStoreBuilder(path, self.label_space.num_labels)
        for chunk in self._chunks():
            builder.add_chunk(*chunk)
        return builder.close()
