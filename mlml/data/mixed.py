"""Several sources as one, each a domain: e.g. synthetic images beside real ones.

`data.source = "mixed"` with `data.mixed.sources = ["synthetic", "annotations"]` builds every
member from its own table (`[data.synthetic]`, `[data.annotations]`, ...) and concatenates them:
rows 0..N0-1 are member 0's images, the next N1 member 1's, and so on. An image's `domain` is the index of its member, whatever the observation
model, so the adversarial branch can remove what tells synthetic from real images.

* **Labels.** Every member must have the same label names (in any order); labels are matched by
  name and stored in member 0's order and groups. The members' labels (positives, and known
  negatives where a member has them) are streamed in chunks through the label store builder into
  one store held in memory: fine for mixing a synthetic set with a folder of up to a few million
  images; a single huge source is better served by its own memory-mapped store.
* **Splits.** Validation and test images come from one member, `data.mixed.eval` (default -1,
  the last: "train on synthetic, test on real"). Training images are drawn at random from the
  rest of every member, or `data.mixed.train = [n0, n1, ...]` of each (summing to `n_train`).
* **Unlabelled members.** `data.mixed.unlabelled = [1]` makes member 1's training images
  unlabelled (nothing observed, as with `labelled_fraction`): the classic domain-adaptation
  setting of labelled synthetic and unlabelled real images. They enter training batches in the
  ratio `data.unlabelled_ratio`; with 0 training uses the labelled members only.
* Images of all members must have the same size (`data.synthetic.image_size` = `data.annotations.image_size`, ...).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mlml.config import ConfigError
from mlml.data.label_store import LabelStore, LabelStoreBuilder, row_chunk
from mlml.data.observation import Observation
from mlml.settings import must


_CHUNK = 1 << 18


@dataclass
class MixedSettings:
    """`[data.mixed]`: the member sources (each configured by its own table) and how they are split."""

    sources: list[str] = field(default_factory=list)      # e.g. ["synthetic", "annotations"]
    eval: int = -1                # validation and test images come from this member (-1: the last)
    train: list[int] = field(default_factory=list)        # training images per member ([] = at random from all)
    unlabelled: list[int] = field(default_factory=list)   # members whose training images carry no labels

    def __post_init__(self) -> None:
        must(len(self.sources) >= 2, "sources", "at least two source names", self.sources)
        must("mixed" not in self.sources, "sources", "sources other than mixed", self.sources)
        must(self.eval >= -1, "eval", ">= -1", self.eval)

    def members(self) -> list[str]:
        return list(self.sources)


class MixedSource:
    """The concatenation of `members` (sources), each image's domain its member's index.

    Args:
        members: the sources, in the order of `names`.
        names: their source names (for messages).
        eval_member: index of the member validation and test images come from (negative: from the end).
        train_counts: training images per member (empty: drawn at random from all members).
        unlabelled: indices of members whose training images carry no labels.
    """

    def __init__(self, members: list[Any], names: list[str], eval_member: int = -1,
                 train_counts: list[int] | tuple[int, ...] = (), unlabelled: list[int] | tuple[int, ...] = ()) -> None:
        if len(members) < 2:
            raise ConfigError(f"data.mixed.sources needs at least two sources, got {names}")
        k = len(members)
        if not -k <= eval_member < k:
            raise ConfigError(f"data.mixed.eval = {eval_member} is not a member of data.mixed.sources = {names}")
        bad = [m for m in unlabelled if not 0 <= m < k]
        if bad:
            raise ConfigError(f"data.mixed.unlabelled = {list(unlabelled)}: {bad} not in 0..{k - 1}")
        if train_counts and len(train_counts) != k:
            raise ConfigError(f"data.mixed.train needs one count per member of data.mixed.sources = {names}, got {list(train_counts)}")
        self.members, self.names = members, names
        self.eval_member = eval_member % k
        self.train_counts = list(train_counts)
        self.unlabelled = tuple(sorted(set(unlabelled)))
        self.label_space = members[0].label_space
        self.offsets = np.cumsum([0] + [len(m) for m in members])
        self.num_domains = k
        self.default_observation = getattr(members[0], "default_observation", "single_positive")
        self.image_size = self._common_image_size()
        self.labels = self._concat_labels()

    def _common_image_size(self) -> int:
        sizes = [int(getattr(m, "image_size", None) or m.image(0).shape[-1]) for m in self.members]
        if len(set(sizes)) > 1:
            raise ConfigError(f"data.mixed.sources: the sources {self.names} give images of sizes {sizes}; make them equal "
                              "(the image_size of each member's table, e.g. data.synthetic.image_size and data.annotations.image_size)")
        return sizes[0]

    def _concat_labels(self) -> LabelStore:
        """The members' labels, renamed to member 0's label order, as one store held in memory."""
        names = self.label_space.names
        with tempfile.TemporaryDirectory(prefix="mlml-mixed-") as tmp:
            builder = LabelStoreBuilder(Path(tmp), len(names))
            for member, source in zip(self.members, self.names):
                theirs = member.label_space.names
                if sorted(theirs) != sorted(names):
                    missing, extra = sorted(set(names) - set(theirs)), sorted(set(theirs) - set(names))
                    raise ConfigError(f"data.mixed.sources: source '{source}' has other label names than '{self.names[0]}' "
                                      f"(missing {missing[:5]}, extra {extra[:5]})")
                order = np.array([names.index(t) for t in theirs], dtype=np.int64)   # their label j -> ours
                store = member.labels
                for start in range(0, len(member), _CHUNK):
                    rows = np.arange(start, min(len(member), start + _CHUNK))
                    lengths, pos = row_chunk(store.indptr, store.indices, rows)
                    neg_lengths, neg = row_chunk(store.neg_indptr, store.neg_indices, rows)
                    builder.add_chunk(lengths, order[pos.astype(np.int64)], neg_lengths,
                                      None if neg is None else order[neg.astype(np.int64)])   # re-sorted per row
            return builder.close().in_memory()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def domain(self, rows: np.ndarray) -> np.ndarray:
        """int64 (B,): the member each row comes from."""
        return (np.searchsorted(self.offsets, np.asarray(rows, dtype=np.int64), side="right") - 1).astype(np.int64)

    def image(self, i: int) -> torch.Tensor:
        m = int(self.domain(np.array([i]))[0])
        return self.members[m].image(i - int(self.offsets[m]))

    def splits(self, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        e = self.eval_member
        held = sizes["val"] + sizes["test"]
        eval_rows = self.offsets[e] + rng.permutation(len(self.members[e]))
        if held > len(eval_rows):
            raise ConfigError(f"data.n_val + data.n_test = {held}, but the evaluation source '{self.names[e]}' "
                              f"(data.mixed.eval) has {len(eval_rows)} images")
        out = {"val": np.sort(eval_rows[: sizes["val"]]), "test": np.sort(eval_rows[sizes["val"] : held])}
        free = [np.arange(self.offsets[m], self.offsets[m + 1]) for m in range(len(self.members))]
        free[e] = eval_rows[held:]
        if self.train_counts:
            if sum(self.train_counts) != sizes["train"]:
                raise ConfigError(f"data.mixed.train = {self.train_counts} must sum to data.n_train = {sizes['train']}")
            for m, (rows, count) in enumerate(zip(free, self.train_counts)):
                if count > len(rows):
                    raise ConfigError(f"data.mixed.train asks {count} training images of '{self.names[m]}', "
                                      f"which has {len(rows)} left")
            train = np.concatenate([rng.permutation(rows)[:count] for rows, count in zip(free, self.train_counts)])
        else:
            pool = np.concatenate(free)
            if sizes["train"] > len(pool):
                raise ConfigError(f"data.n_train = {sizes['train']}, but the sources {self.names} have {len(pool)} "
                                  "images besides validation and test")
            train = rng.permutation(pool)[: sizes["train"]]
        out["train"] = np.sort(train)
        return {name: out[name] for name in sizes}


class MemberDomains(Observation):
    """An observation model whose images take their domain from the mixed source's members.

    `inner` decides what is observed; images of the `unlabelled` members observe nothing.
    """

    def __init__(self, inner: Observation, member_of: Callable[[np.ndarray], np.ndarray], num_members: int,
                 unlabelled: tuple[int, ...] = ()) -> None:
        super().__init__(inner.label_space, inner.seed, inner.settings)
        self.inner, self.member_of, self.num_members = inner, member_of, num_members
        self.unlabelled = np.array(unlabelled, dtype=np.int64)

    def observe(self, rows: np.ndarray, full: torch.Tensor) -> torch.Tensor:
        return self.inner.observe(rows, full)

    def labelled(self, rows: np.ndarray) -> np.ndarray:
        return self.inner.labelled(rows) & ~np.isin(self.member_of(rows), self.unlabelled)

    def domain(self, rows: np.ndarray) -> np.ndarray:
        return self.member_of(rows)

    @property
    def num_domains(self) -> int:
        return self.num_members

    @property
    def has_unlabelled(self) -> bool:
        return self.inner.has_unlabelled or len(self.unlabelled) > 0
