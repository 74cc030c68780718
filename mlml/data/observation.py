"""Observation models: what training sees of the full labels.

An observation model maps the rows (source indices) of a batch and their full labels to
`targets: float (B, C)` and `observed: bool (B, C)`. Unobserved entries have target 0 and must be
read through the mask only. Every choice is a pure function of (seed, row[, label]) through a
counter-based hash, so it is the same every epoch, on every worker and rank, and needs no
per-image state even for 12M images.

Models (`data.observation`, with `data.observation_args`):
  full               every label observed.
  single_positive    one true positive per image, uniformly at random (Cole et al., CVPR 2021).
  partial            each label observed with probability `p` (positives and negatives alike).
  per_group          the image comes from one group's collection: all labels of that group are
                     observed, nothing else. The collection is the image's `domain`.
  unlabelled         nothing observed.
  annotated          what the source's annotations say: its stored positives observed positive,
                     its stored known negatives observed negative, everything else unknown. The
                     default for image folders and annotation files (`data.observation = "auto"`).
Any model takes `labelled_fraction` (default 1): the other images are unlabelled (observed all False,
domain 1 for labelled-vs-unlabelled domain branches, unless per_group sets domains).
`single_positive` also takes `balanced` (default false): the labelled images are drawn so that every
class's observed positive is equally likely to be labelled (FixMatch's "N labels per class", for
single positives): an image whose observed positive is class c is labelled with probability p_c,
p_c x N_c the same for every class (N_c: images of the source whose observed positive is c) up to
p_c = 1, and the labelled images `labelled_fraction` of those with a positive. A random draw of 1%
of 5,000 images leaves rare classes without a single labelled positive (README, "Semi-supervised
study"); the balanced draw is still one hash per image, fixed for the seed.

Each model's `data.observation_args` are its `Settings` dataclass (mlml/settings.py), checked when
the config is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mlml.data.label_store import LabelStore
from mlml.labels import LabelSpace
from mlml.registry import Registry
from mlml.settings import must, resolve, settings_class

OBSERVATIONS: Registry = Registry("observation model")

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def hash_uniform(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1) from integer keys (splitmix64 mixing); broadcasts like numpy.

    All-`int` keys (one value per dataset item, the augmentation seed) take a pure-Python path,
    equal bit for bit and ~5x faster than numpy on scalars.
    """
    if all(type(k) is int for k in keys):
        return np.float64(_hash_uniform_ints(keys))
    h = np.zeros(np.broadcast(*[np.asarray(k) for k in keys]).shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = h ^ np.asarray(k, dtype=np.int64).astype(np.uint64)
            h = h + _GOLDEN
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


_MASK = (1 << 64) - 1


def _hash_uniform_ints(keys: tuple[int, ...]) -> float:
    """`hash_uniform` of Python ints, in Python integer arithmetic modulo 2**64."""
    m1, m2, golden = int(_M1), int(_M2), int(_GOLDEN)
    h = 0
    for k in keys:
        h = ((h ^ (k & _MASK)) + golden) & _MASK
        h = ((h ^ (h >> 30)) * m1) & _MASK
        h = ((h ^ (h >> 27)) * m2) & _MASK
        h ^= h >> 31
    return (h >> 11) / float(1 << 53)


@dataclass
class ObservationSettings:
    """`data.observation_args` every model takes."""

    labelled_fraction: float = 1.0   # the other images are unlabelled

    def __post_init__(self) -> None:
        must(0.0 <= self.labelled_fraction <= 1.0, "labelled_fraction", "in [0, 1]", self.labelled_fraction)


@dataclass
class SinglePositiveSettings(ObservationSettings):
    """`data.observation_args` of `single_positive`."""

    balanced: bool = False           # labelled images drawn class-balanced by their observed positive (module docstring)


@dataclass
class PartialSettings(ObservationSettings):
    """`data.observation_args` of `partial`."""

    p: float = 0.1                   # probability that a label is observed

    def __post_init__(self) -> None:
        super().__post_init__()
        must(0.0 < self.p <= 1.0, "p", "in (0, 1]", self.p)


class Observation:
    """Base class. Subclasses implement `observe(rows, full) -> observed (B, C) bool` and declare
    their `data.observation_args` as `Settings`."""

    Settings: type = ObservationSettings

    def __init__(self, label_space: LabelSpace, seed: int, settings: ObservationSettings | None = None) -> None:
        self.label_space = label_space
        self.seed = seed
        self.settings = settings if settings is not None else self.Settings()
        self.labelled_fraction = self.settings.labelled_fraction

    def observe(self, rows: np.ndarray, full: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def labelled(self, rows: np.ndarray) -> np.ndarray:
        """bool (B,): which images carry labels at all."""
        if self.labelled_fraction >= 1.0:
            return np.ones(len(rows), dtype=bool)
        return hash_uniform(self.seed, 7, rows) < self.labelled_fraction

    def domain(self, rows: np.ndarray) -> np.ndarray:
        """int64 (B,): the collection an image came from (0 labelled, 1 unlabelled by default)."""
        return (~self.labelled(rows)).astype(np.int64)

    @property
    def num_domains(self) -> int:
        return 1 if self.labelled_fraction >= 1.0 else 2

    @property
    def has_unlabelled(self) -> bool:
        """Whether some training images carry no labels (training then mixes them in by ratio)."""
        return self.labelled_fraction < 1.0

    def __call__(self, rows: np.ndarray, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows int (B,), full bool (B, C) -> (targets float (B, C), observed bool (B, C))."""
        rows = np.asarray(rows, dtype=np.int64)
        observed = self.observe(rows, full)
        observed &= torch.from_numpy(self.labelled(rows))[:, None]
        targets = (full & observed).float()
        return targets, observed


@OBSERVATIONS.register("full")
class Full(Observation):
    """Every label observed."""

    def observe(self, rows: np.ndarray, full: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(full)


@OBSERVATIONS.register("unlabelled")
class Unlabelled(Observation):
    """Nothing observed."""

    def observe(self, rows: np.ndarray, full: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(full)


@OBSERVATIONS.register("single_positive")
class SinglePositive(Observation):
    """One positive per image, chosen uniformly among its positives; images without any observe none.
    With `balanced = true` the labelled images are drawn class-balanced (module docstring), which
    reads the source's label store."""

    Settings = SinglePositiveSettings
    reads_labels = True               # with balanced = true

    def __init__(self, label_space: LabelSpace, seed: int, settings: SinglePositiveSettings | None = None,
                 labels: LabelStore | None = None) -> None:
        super().__init__(label_space, seed, settings)
        self.labels, self.share = None, None
        if self.settings.balanced and self.labelled_fraction < 1.0:
            if labels is None:
                raise ValueError("single_positive with balanced = true needs the source's label store")
            self.labels = labels
            counts = np.zeros(labels.num_labels, dtype=np.int64)
            with_positive = 0
            for start in range(0, len(labels), _CHUNK):
                observed = self.observed_positive(np.arange(start, min(start + _CHUNK, len(labels))))
                counts += np.bincount(observed[observed >= 0], minlength=labels.num_labels)
                with_positive += int((observed >= 0).sum())
            self.share = balanced_shares(counts, self.labelled_fraction * with_positive)

    def observe(self, rows: np.ndarray, full: torch.Tensor) -> torch.Tensor:
        counts = full.sum(1)                                                    # (B,)
        u = torch.from_numpy(hash_uniform(self.seed, 1, rows))
        pick = (u * counts).long()                                              # k-th positive, 0-based
        rank = full.long().cumsum(1) - 1                                        # (B, C) rank among positives
        return full & (rank == pick[:, None])

    def observed_positive(self, rows: np.ndarray) -> np.ndarray:
        """int64 (B,): the label `observe` picks for each row, from the label store (-1: no positive)."""
        store = self.labels
        rows = np.asarray(rows, dtype=np.int64)
        starts = store.indptr[rows].astype(np.int64)
        counts = store.indptr[rows + 1].astype(np.int64) - starts
        pick = (hash_uniform(self.seed, 1, rows) * counts).astype(np.int64)  # as observe: rows are sorted
        out = np.full(len(rows), -1, dtype=np.int64)
        has = counts > 0
        out[has] = store.indices[starts[has] + pick[has]]
        return out

    def labelled(self, rows: np.ndarray) -> np.ndarray:
        if self.share is None:
            return super().labelled(rows)
        observed = self.observed_positive(rows)
        share = np.where(observed >= 0, self.share[np.maximum(observed, 0)], self.labelled_fraction)
        return hash_uniform(self.seed, 7, rows) < share


_CHUNK = 1 << 20  # rows whose observed positive is read per step when the balanced shares are counted


def balanced_shares(counts: np.ndarray, total: float) -> np.ndarray:
    """float (C,): p_c with p_c x counts_c equal across classes, capped at p_c = 1, summing to `total`
    labelled images (water-filling: the rarest classes are labelled whole, the rest share what is left)."""
    share = np.zeros(len(counts), dtype=np.float64)
    order = np.argsort(counts, kind="stable")
    left, remaining = float(total), int((counts > 0).sum())
    for c in order:
        if counts[c] == 0:
            continue
        quota = left / remaining
        share[c] = min(1.0, quota / counts[c])
        left -= share[c] * counts[c]
        remaining -= 1
    return share


@OBSERVATIONS.register("partial")
class Partial(Observation):
    """Each label observed with probability `p`, positives and negatives alike."""

    Settings = PartialSettings

    def __init__(self, label_space: LabelSpace, seed: int, settings: PartialSettings | None = None) -> None:
        super().__init__(label_space, seed, settings)
        self.p = self.settings.p

    def observe(self, rows: np.ndarray, full: torch.Tensor) -> torch.Tensor:
        labels = np.arange(full.shape[1])
        return torch.from_numpy(hash_uniform(self.seed, 2, rows[:, None], labels[None, :]) < self.p)


@OBSERVATIONS.register("per_group")
class PerGroup(Observation):
    """Each image belongs to one group's collection, uniformly at random; that group is observed."""

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        n = len(self.label_space.groups)
        return np.minimum((hash_uniform(self.seed, 3, rows) * n).astype(np.int64), n - 1)

    def observe(self, rows: np.ndarray, full: torch.Tensor) -> torch.Tensor:
        masks = torch.stack([self.label_space.group_mask(g) for g in self.label_space.groups])  # (G, C)
        return masks[torch.from_numpy(self.group_of(rows))].clone()

    def domain(self, rows: np.ndarray) -> np.ndarray:
        return self.group_of(rows)

    @property
    def num_domains(self) -> int:
        return len(self.label_space.groups)


@OBSERVATIONS.register("annotated")
class Annotated(Observation):
    """The stored labels as they are: positives and known negatives observed, the rest unknown."""

    reads_labels = True

    def __init__(self, label_space: LabelSpace, seed: int, settings: ObservationSettings | None = None,
                 labels: LabelStore | None = None) -> None:
        super().__init__(label_space, seed, settings)
        if labels is None:
            raise ValueError("observation model 'annotated' needs the source's label store")
        self.labels = labels

    def observe(self, rows: np.ndarray, full: torch.Tensor) -> torch.Tensor:
        return full | self.labels.dense_negatives(rows)


def build_observation(name: str, label_space: LabelSpace, seed: int, args: dict, labels: LabelStore | None = None) -> Observation:
    """The observation model `name` with its settings `args` (`data.observation_args`, resolved:
    a `ConfigError` names a bad key); `labels` (the source's store) goes to models that read it."""
    cls: Callable[..., Observation] = OBSERVATIONS.get(name)
    settings = resolve(settings_class(cls), args, "data.observation_args", f"observation model '{name}'")
    if getattr(cls, "reads_labels", False):   # the model says itself when it needs them
        return cls(label_space, seed, settings, labels=labels)
    return cls(label_space, seed, settings)
