"""Tencent ML-Images image lists: `path idx:conf idx:conf ...`, one image per line.

`idx` is a label index into the label names (`data.tencent.label_names`: a `.txt` with one name per line,
line k naming index k, or the ML-Images dictionary `dictionary_and_semantic_hierarchy.txt`, tab
separated with the index first and the name last), `conf` its confidence in [0, 1]. A label whose
confidence is at least `data.tencent.confidence_threshold` is positive; listed labels below it are unknown;
labels not listed count negative in evaluation (complete labels, as ML-Images trains). The
confidences are kept in the index (`confidence/`: every listed label, `confidence.npy` aligned with
it) and read back with `TencentSource.confidences(i)`. Paths are relative to `data.tencent.root` (default:
the list's folder). `data.tencent.file`: one list, or one per split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mlml.data.annotations import AnnotationError, AnnotationSettings, Entry, IndexedSource, read_label_names, write_index
from mlml.data.label_store import LabelStore, LabelStoreBuilder, finish_npy, load_npy
from mlml.labels import LabelSpace
from mlml.settings import must


def read_dictionary(path: Path) -> LabelSpace:
    """Label names from a `.txt` (one a line) or the ML-Images dictionary (tab separated, index first, name last)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines or "\t" not in lines[0]:
        return read_label_names(path)
    names: list[str] = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        cells = line.split("\t")
        if not line.strip() or not cells[0].strip().isdigit():
            continue                                                  # blank line or header
        if int(cells[0]) != len(names):
            raise AnnotationError(path, line_no, f"index {cells[0]}, expected {len(names)} (indices must run 0, 1, ...)")
        names.append(cells[-1].strip())
    return LabelSpace(tuple(names))


def read_tencent(path: Path, label_space: LabelSpace, split: str = "") -> Iterator[tuple[Entry, list[int], list[float]]]:
    """(entry without positives, listed label indices sorted, their confidences) of each line."""
    C = label_space.num_labels
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            pairs: dict[int, float] = {}
            for field in fields[1:]:
                idx, sep, conf = field.partition(":")
                try:
                    k, c = int(idx), float(conf)
                except ValueError:
                    raise AnnotationError(path, line_no, f"'{field}' is not idx:conf") from None
                if not sep or not 0 <= k < C or not (0.0 <= c <= 1.0) or math.isnan(c):
                    raise AnnotationError(path, line_no, f"'{field}': the index must be in [0, {C}) and the confidence in [0, 1]")
                if k in pairs:
                    raise AnnotationError(path, line_no, f"label {k} is listed twice")
                pairs[k] = c
            listed = sorted(pairs)
            yield Entry(fields[0], [], [], split, path, line_no), listed, [pairs[k] for k in listed]


def write_tencent_index(files: dict[str, Path], label_space: LabelSpace, threshold: float, root: Path, out: Path,
                        allow_outside_root: bool = False) -> dict:
    """The index of the lists, with every listed label's confidence beside it."""
    listed_store = LabelStoreBuilder(out / "confidence", label_space.num_labels)
    with open(out / "confidence.raw", "wb") as conf_file:
        def entries() -> Iterator[Entry]:
            for split, path in files.items():
                for entry, listed, conf in read_tencent(path, label_space, split):
                    listed_store.add(listed)
                    conf_file.write(np.asarray(conf, dtype=np.float32).tobytes())
                    yield entry._replace(positives=[k for k, c in zip(listed, conf) if c >= threshold])

        info = write_index(entries(), label_space, root, out, "tencent", next(iter(files.values())), allow_outside_root)
    store = listed_store.close()
    finish_npy(out / "confidence.raw", out / "confidence.npy", np.dtype(np.float32), int(store.indptr[-1]))
    return info



@dataclass(kw_only=True)
class TencentSettings(AnnotationSettings):
    """`[data.tencent]`: image list(s), the label dictionary, the confidence that makes a label positive."""

    confidence_threshold: float = 0.5   # a listed label with at least this confidence is positive

    def __post_init__(self) -> None:
        super().__post_init__()
        must(0 < self.confidence_threshold <= 1, "confidence_threshold", "in (0, 1]", self.confidence_threshold)


class TencentSource(IndexedSource):
    """Images of Tencent ML-Images lists; positives: listed labels with confidence >= `threshold` (see module doc)."""

    def __init__(self, files: dict[str, Path], label_names: Path, root: Path | None, image_size: int, threshold: float = 0.5,
                 store: str | Path | None = None, allow_outside_root: bool = False) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"data.tencent.confidence_threshold = {threshold} is out of range (0, 1]")
        root = root or next(iter(files.values())).parent
        space = read_dictionary(label_names)
        read = lambda out: write_tencent_index(files, space, threshold, root, out, allow_outside_root)   # noqa: E731
        super().__init__("tencent", [*files.values(), label_names], root, image_size, read, store, [sorted(files), threshold],
                         allow_outside_root)
        self.listed = LabelStore.open(self.store / "confidence")
        self.confidence = load_npy(self.store / "confidence.npy")

    def confidences(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(listed label indices, their confidences) of image i, as the list gave them."""
        start, end = int(self.listed.indptr[i]), int(self.listed.indptr[i + 1])
        return np.asarray(self.listed.indices[start:end]), np.asarray(self.confidence[start:end])
