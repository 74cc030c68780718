"""From a source to batches: split datasets, per-sample views, deterministic samplers, collate.

A dataset item is `{"index": k, <view name>: uint8 (3, H, W), ...}`; the collate step stacks the
views and assembles `targets`, `observed` and `domain` for the batch from the sparse label store and
the observation model (labels are densified per batch, never stored dense). Batches never carry the
hidden ground truth: evaluation and diagnostics ask for it by name (`Data.hidden_labels`).

An image that cannot be read becomes the item `{"index": k, "skipped": True}` (with a warning
naming the file) unless the dataset is strict, when the error stops the run. The collate step
drops skipped items, so a batch may be smaller than asked (even empty), and reports how many it
dropped as `skipped` (a 0-dim long tensor), which reaches the main process from any worker.

Augmentation is a pure function of (seed, epoch, index, view): the train sampler yields
`(index, epoch)` pairs, so persistent workers, any number of workers and a resume in the middle of
an epoch all see the same random crops.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mlml.data.image_files import UnreadableImageError
from mlml.data.label_store import LabelStore
from mlml.data.observation import Observation, hash_uniform
from mlml.data.transforms import Transform



class SplitDataset(Dataset):
    """The images of `rows` of a source, each returned in the views that were asked for.

    Args:
        images: callable row -> uint8 (3, H, W) (a source's `image`, or a cache of it).
        rows: int64 (N,) source indices of this split; item k is source row `rows[k]`.
        views: view name -> transform of a uint8 image (e.g. {"image": weak, "image_strong": strong}).
        seed: seeds the per-sample augmentation.
        strict: an unreadable image raises instead of giving a skipped item.
    """

    def __init__(self, images: Callable[[int], torch.Tensor], rows: np.ndarray, views: dict[str, Transform], seed: int, strict: bool = False) -> None:
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.views = views
        self.seed = seed
        self.strict = strict

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        k, epoch = item if isinstance(item, tuple) else (item, 0)
        try:
            image = self.images(int(self.rows[k]))
        except UnreadableImageError as err:
            if self.strict:
                raise
            warnings.warn(f"skipped: {err}", stacklevel=2)
            return {"index": k, "skipped": True}
        out: dict = {"index": k}
        for v, (name, transform) in enumerate(self.views.items()):
            out[name] = transform(image, int(hash_uniform(self.seed, epoch, k, v) * 2**53))
        return out


class Collate:
    """Stacks views and assembles the label tensors of a batch (runs inside loader workers)."""

    def __init__(self, rows: np.ndarray, labels: LabelStore, observation: Observation) -> None:
        self.rows = rows
        self.labels = labels
        self.observation = observation

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        readable = [it for it in items if "skipped" not in it]
        index = torch.tensor([it["index"] for it in readable], dtype=torch.long)
        rows = self.rows[index.numpy()]
        full = self.labels.dense(rows)                                     # bool (B, C)
        targets, observed = self.observation(rows, full)
        views = [name for name in (readable or items)[0] if name not in ("index", "skipped")]
        batch = {name: torch.stack([it[name] for it in readable]) if readable else torch.zeros(0, dtype=torch.uint8) for name in views}
        batch.update(
            skipped=torch.tensor(len(items) - len(readable)),
            index=index,
            targets=targets,
            observed=observed,
            domain=torch.from_numpy(self.observation.domain(rows)),
        )
        return batch


class EpochSampler(Sampler):
    """Deterministic per-epoch order, sharded across ranks, resumable mid-epoch.

    Like `DistributedSampler`: the permutation depends on (seed, epoch); it is padded by repeating
    its start to a multiple of `world_size` and rank r takes every world_size-th item from r.
    With `global_batch` (training) only whole global batches of the permutation are used instead,
    so the k-th global batch, and the number of steps per epoch, are the same at any world size.
    `set_epoch(epoch, skip)` drops the first `skip` items of this rank (a resume mid-epoch).
    Yields `(index, epoch)` pairs when `with_epoch`, else plain indices.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, with_epoch: bool = True,
                 global_batch: int = 0) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.with_epoch = rank, world_size, with_epoch
        self.epoch, self.skip = 0, 0
        self.whole_batches = n // global_batch * global_batch if global_batch and n >= global_batch else 0
        self.per_rank = self.whole_batches // world_size if self.whole_batches else math.ceil(n / world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        if self.whole_batches:
            order = order[:total]                        # drop the last incomplete global batch
        else:
            order += order[: total - self.n]             # pad so every rank gets the same count
        return order[self.rank : total : self.world_size][self.skip :]

    def __iter__(self) -> Iterator:
        for k in self.indices():
            yield (k, self.epoch) if self.with_epoch else k

    def __len__(self) -> int:
        return self.per_rank - self.skip


class MixedBatchSampler(Sampler):
    """Batches of labelled and unlabelled images in a fixed ratio (semi-supervised training).

    Each global batch holds `n_labelled` images drawn from `labelled` and `n_unlabelled` from
    `unlabelled` (positions in the split). Each stream walks through its own seeded permutations
    and starts a fresh one when it runs out, so the labelled images repeat more often than the
    unlabelled ones. An epoch is `steps` batches; batch s of epoch e is a pure function of
    (seed, e * steps + s), hence resumable anywhere. Rank r takes every world_size-th image of each
    stream of the global batch. Yields lists of `(index, pass)` pairs, `pass` counting the stream's
    permutations so that a repeated image gets a fresh augmentation.
    """

    def __init__(self, labelled: np.ndarray, unlabelled: np.ndarray, n_labelled: int, n_unlabelled: int, steps: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n_labelled % world_size or n_unlabelled % world_size:
            raise ValueError(f"labelled ({n_labelled}) and unlabelled ({n_unlabelled}) images per batch must both be "
                             f"divisible by the world size {world_size}; adjust data.batch_size or data.unlabelled_ratio")
        if n_labelled and not len(labelled) or n_unlabelled and not len(unlabelled):
            raise ValueError("the training split has no labelled or no unlabelled images for a mixed batch")
        self.streams = [(np.asarray(labelled), n_labelled, 0), (np.asarray(unlabelled), n_unlabelled, 1)]
        self.steps, self.seed, self.rank, self.world_size = steps, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """`skip` counts this rank's items, as for `EpochSampler`."""
        self.epoch, self.skip = epoch, skip

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This rank's share of global batch `step` (counted from the start of training)."""
        out: list[tuple[int, int]] = []
        for pool, size, stream in self.streams:
            if not size:
                continue
            first = step * size
            pos = np.arange(first, first + size)[self.rank :: self.world_size]
            for cycle in np.unique(pos // len(pool)):
                g = torch.Generator().manual_seed(self.seed * 100_003 + 7919 * stream + int(cycle))
                perm = torch.randperm(len(pool), generator=g).numpy()
                take = pos[pos // len(pool) == cycle] % len(pool)
                out += [(int(pool[perm[t]]), int(cycle) * 2 + stream) for t in take]
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = sum(size for _, size, _ in self.streams) // self.world_size
        for s in range(self.skip // per_rank, self.steps):
            yield self.batch(self.epoch * self.steps + s)

    def __len__(self) -> int:
        per_rank = sum(size for _, size, _ in self.streams) // self.world_size
        return self.steps - self.skip // per_rank


def epoch_sampler(loader) -> Sampler:
    """The object of a training loader that takes `set_epoch(epoch, skip)`."""
    return loader.batch_sampler if hasattr(loader.batch_sampler, "set_epoch") else loader.sampler
