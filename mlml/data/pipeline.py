"""Data: sources of images with full labels, observation models, splits and loaders.

A *source* (registered in `SOURCES`, entry-point group `mlml.sources`) is any object with
`label_space: LabelSpace`, `labels: LabelStore` (full positives of every image, and the known
negatives where the source has them), `__len__`, and `image(i) -> uint8 (3, H, W)`; optionally
`images(rows)` (batched rendering, used to cache), `splits(sizes, seed) -> {"train": rows, ...}`,
`image_size` and `default_observation` (used when `data.observation = "auto"`). `image(i)` may
raise `UnreadableImageError`: the item is then skipped and counted (or the run stops, `data.strict`).

Sources: `synthetic` (built-in colour + object), `folder` (ImageNet-style class folders),
`annotations` (a CSV/JSONL annotation file and a label names file), `recolour` (a folder or
annotation file with every image recoloured to one colour class: colour + object groups), `mixed`
(several of these concatenated, each a domain: `mlml.data.mixed`). A source with domains of its
own (`domain(rows)`, `num_domains`, `unlabelled`) gives every image its domain, whatever the
observation model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlml.config import ConfigError, DataConfig
from mlml.data.annotations import AnnotationSource
from mlml.data.dataset import Collate, EpochSampler, MixedBatchSampler, SplitDataset
from mlml.data.folder import ImageFolderSource
from mlml.data.label_store import LabelStore
from mlml.data.mixed import MemberDomains, MixedSource
from mlml.data.observation import Full, Observation, build_observation
from mlml.data.recolour import RecolourSource
from mlml.data.synthetic import SyntheticSource, nuisance_styles
from mlml.data.transforms import build_views
from mlml.labels import LabelSpace, configure_groups
from mlml.registry import Registry

SOURCES: Registry = Registry("source", entry_point_group="mlml.sources")
SPLITS = ("train", "val", "test")


@SOURCES.register("synthetic")
def synthetic(cfg: DataConfig) -> SyntheticSource:
    return SyntheticSource(cfg.synthetic, cfg.n_train + cfg.n_val + cfg.n_test, cfg.data_seed)


def _path(cfg: DataConfig, key: str, kind: str = "file") -> Path:
    """The path config key `data.<key>` names, checked to exist (errors name the key)."""
    value = getattr(cfg, key)
    if not value:
        raise ConfigError(f"data.source = '{cfg.source}' needs data.{key}")
    path = Path(value).expanduser()
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        raise ConfigError(f"data.{key} = '{value}': no such {kind}")
    return path


def _image_size(cfg: DataConfig) -> int:
    if not 8 <= cfg.image_size <= 1024:
        raise ConfigError(f"data.image_size = {cfg.image_size} is out of range [8, 1024]")
    return cfg.image_size


@SOURCES.register("folder")
def folder(cfg: DataConfig) -> ImageFolderSource:
    return ImageFolderSource(_path(cfg, "root", "folder"), _image_size(cfg), cfg.store or None)


@SOURCES.register("annotations")
def annotations(cfg: DataConfig) -> AnnotationSource:
    root = _path(cfg, "root", "folder") if cfg.root else None
    return AnnotationSource(_path(cfg, "annotations"), _path(cfg, "label_names"), root, _image_size(cfg), cfg.store or None,
                            cfg.allow_outside_root)


@SOURCES.register("recolour")
def recolour(cfg: DataConfig) -> RecolourSource:
    """A folder (or, when data.annotations is set, an annotation source) with a colour group added."""
    inner = annotations(cfg) if cfg.annotations else folder(cfg)
    return RecolourSource(inner, cfg.colours, cfg.data_seed)


@SOURCES.register("mixed")
def mixed(cfg: DataConfig) -> MixedSource:
    """The sources named in data.mixed, concatenated; each image's domain is its source's index."""
    if "mixed" in cfg.mixed:
        raise ConfigError("data.mixed cannot contain 'mixed'")
    members = [SOURCES.get(name)(cfg) for name in cfg.mixed]
    return MixedSource(members, list(cfg.mixed), cfg.mixed_eval, cfg.mixed_train, cfg.mixed_unlabelled)


def default_splits(n: int, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint random splits of `range(n)` with the given sizes (a fixed permutation of `seed`)."""
    if sum(sizes.values()) > n:
        raise ValueError(f"split sizes {sizes} need {sum(sizes.values())} images; the source has {n}")
    perm = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = np.sort(perm[start : start + size])
        start += size
    return out


def split_hash(splits: dict[str, np.ndarray]) -> str:
    """A stable hash (16 hex digits) of the split definition: each split's name and image indices.

    Recorded in `metrics.json`; runs whose splits differ never share a table row.
    """
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(f"{name}:{len(splits[name])}:".encode())
        digest.update(np.asarray(splits[name], dtype="<i8").tobytes())
    return digest.hexdigest()[:16]


class ImageCache:
    """Renders (or loads) the images of some rows once and serves them from memory as uint8."""

    def __init__(self, source: Any, rows: np.ndarray, chunk: int = 1024) -> None:
        rows = np.sort(np.asarray(rows))
        self.position = {int(r): i for i, r in enumerate(rows)}
        self.images = torch.cat([source.images(rows[i : i + chunk]) for i in range(0, len(rows), chunk)])

    def __call__(self, row: int) -> torch.Tensor:
        return self.images[self.position[row]]


@dataclass
class Data:
    """A source with its splits and observation model; makes datasets and loaders."""

    cfg: DataConfig
    source: Any
    splits: dict[str, np.ndarray]
    observation: Observation
    image: Callable[[int], torch.Tensor]
    label_space: LabelSpace   # the source's, with the groups of `data.groups` applied

    @property
    def labels(self) -> LabelStore:
        return self.source.labels

    @property
    def image_size(self) -> int:
        size = getattr(self.source, "image_size", None)
        return int(size) if size else int(self.image(int(self.splits["train"][0])).shape[-1])

    def hidden_labels(self, split: str, positions: np.ndarray) -> torch.Tensor:
        """bool (n, C): the full ground truth of `positions` in `split` — the answer key.

        For evaluation and logged diagnostics only (e.g. pseudo-label precision); never a training
        signal. Batches do not carry it; a method reaches it only through
        `MethodContext.hidden_labels_for_diagnostics`.
        """
        return self.labels.dense(self.splits[split][np.asarray(positions, dtype=np.int64)])

    def observation_for(self, split: str) -> Observation:
        """Training sees the observation model; test always full labels; val as configured."""
        if split == "train" or (split == "val" and self.cfg.val_labels == "observed"):
            return self.observation
        return Full(self.label_space, self.cfg.data_seed)

    def dataset(self, split: str, views: dict[str, str], seed: int) -> SplitDataset:
        return SplitDataset(self.image, self.splits[split], build_views(views, self.image_size), seed, self.cfg.strict)

    def loader(self, split: str, views: dict[str, str], seed: int, rank: int = 0, world_size: int = 1, batch_size: int | None = None) -> DataLoader:
        """Train: shuffled per epoch, last incomplete batch dropped. Eval: in order, padded per rank."""
        train = split == "train"
        dataset = self.dataset(split, views, seed)
        batch = batch_size or self.cfg.batch_size
        workers = self.cfg.num_workers
        common = dict(
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=Collate(dataset.rows, self.labels, self.observation_for(split)),
            # Its own generator: starting an epoch's iterator draws a worker base seed, which must not
            # come from the global RNG, or a resume mid-epoch would shift dropout & co. (unused otherwise).
            generator=torch.Generator().manual_seed(seed),
        )
        if train and self.observation.has_unlabelled:
            return DataLoader(dataset, batch_sampler=self.mixed_sampler(dataset.rows, batch * world_size, seed, rank, world_size), **common)
        sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size, with_epoch=train,
                               global_batch=batch * world_size if train else 0)
        return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=train and len(sampler) >= batch, **common)

    def mixed_sampler(self, rows: np.ndarray, global_batch: int, seed: int, rank: int, world_size: int) -> MixedBatchSampler:
        """Training batches of labelled and unlabelled images in the ratio `data.unlabelled_ratio`.

        The number of steps per epoch is that of a fully labelled split of the same size, whatever
        the ratio, so runs with and without unlabelled images take the same optimiser steps.
        """
        ratio = self.cfg.unlabelled_ratio
        if ratio < 0:
            raise ValueError(f"data.unlabelled_ratio must be >= 0, got {ratio}")
        n_labelled = round(global_batch / (1.0 + ratio))
        labelled = self.observation.labelled(rows)
        positions = np.arange(len(rows))
        steps = max(1, len(rows) // global_batch)
        return MixedBatchSampler(positions[labelled], positions[~labelled], n_labelled, global_batch - n_labelled,
                                 steps, seed, rank, world_size)


def build_data(cfg: DataConfig) -> Data:
    if cfg.val_labels not in ("full", "observed"):
        raise ValueError(f"data.val_labels must be 'full' or 'observed', got '{cfg.val_labels}'")
    source = SOURCES.get(cfg.source)(cfg)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    splitter = getattr(source, "splits", None)
    splits = splitter(sizes, cfg.data_seed) if splitter else default_splits(len(source), sizes, cfg.data_seed)
    label_space = configure_groups(source.label_space, cfg.groups)
    name = cfg.observation if cfg.observation != "auto" else getattr(source, "default_observation", "single_positive")
    observation = build_observation(name, label_space, cfg.data_seed, cfg.observation_args, source.labels)
    if hasattr(source, "domain"):
        observation = MemberDomains(observation, source.domain, source.num_domains, tuple(getattr(source, "unlabelled", ())))
    if cfg.source == "synthetic" and cfg.synthetic.nuisance == "collection":   # the shortcut scenario
        if observation.num_domains < 2:
            raise ConfigError("data.synthetic.nuisance = 'collection' needs an observation model with collections "
                              "(data.observation = 'per_group', or observation_args.labelled_fraction < 1)")
        train = splits["train"]
        source.set_styles(nuisance_styles(len(source), train, observation.domain(train), observation.num_domains,
                                          cfg.data_seed), observation.num_domains)
    image: Callable[[int], torch.Tensor] = source.image
    if hasattr(source, "images"):
        image = ImageCache(source, np.concatenate([splits[s] for s in SPLITS]))
    return Data(cfg, source, splits, observation, image, label_space)
