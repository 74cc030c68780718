"""Labels of N images over C labels as compressed sparse rows: positives and known negatives.

At the scale mlml is built for (12M images x 11K labels) a dense bool matrix would take 132 GB;
an image has a handful of positives, so rows of label indices are stored:

    indptr  (N + 1,) uint32, or int64 once there are 2^32 entries or more
    indices (nnz,)   uint16, or int32 when C > 65,536; sorted within a row

row i being `indices[indptr[i]:indptr[i + 1]]`. Known negatives (an annotation file may list them)
form a second CSR of the same kind, absent when there are none. Everything else is unknown.

On disk a store is a directory of `.npy` files and `meta.json` (no pickle), opened memory-mapped:
loader workers share its pages, a row lookup is O(1), and a disk-backed store pickles as its path.
`LabelStoreBuilder` writes one by streaming rows, with memory bounded by its flush size. Batches
are densified to (B, C) only in the collate step. For 12M images with 3 positives each the store
takes 72 MB of indices and 48 MB of indptr.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

FORMAT = 1
_COPY_CHUNK = 1 << 20  # entries copied per step when a streamed file is finalised


def index_dtype(num_labels: int) -> np.dtype:
    """The smallest dtype holding label indices in [0, num_labels)."""
    return np.dtype(np.uint16 if num_labels <= 1 << 16 else np.int32)


def indptr_dtype(nnz: int) -> np.dtype:
    return np.dtype(np.uint32 if nnz < 1 << 32 else np.int64)


def densify(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, num_labels: int) -> torch.Tensor:
    """bool (B, C): True at the stored entries of `rows` of a CSR pair, without a Python loop."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = indptr[rows].astype(np.int64)
    lengths = indptr[rows + 1].astype(np.int64) - starts
    total = int(lengths.sum())
    # Position of every stored entry of the requested rows: its row's start plus its rank in the row.
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
    out = np.zeros((len(rows), num_labels), dtype=bool)
    flat = np.repeat(np.arange(len(rows), dtype=np.int64) * num_labels, lengths) + indices[offsets]
    out.reshape(-1)[flat] = True
    return torch.from_numpy(out)


class LabelStore:
    """Positives (and optionally known negatives) of N images over C labels, as CSR arrays.

    Args:
        indptr, indices: CSR of the positives (in memory or memory-mapped).
        num_labels: C.
        neg_indptr, neg_indices: CSR of the known negatives, or None when none are known.
        path: the directory the arrays were opened from (a disk-backed store pickles as it).
    """

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        num_labels: int,
        neg_indptr: np.ndarray | None = None,
        neg_indices: np.ndarray | None = None,
        path: Path | None = None,
    ) -> None:
        for name, (ptr, idx) in {"indptr": (indptr, indices), "neg_indptr": (neg_indptr, neg_indices)}.items():
            if ptr is not None and (ptr.ndim != 1 or ptr[0] != 0 or int(ptr[-1]) != len(idx)):
                raise ValueError(f"{name} must start at 0 and end at the number of stored entries")
        if neg_indptr is not None and len(neg_indptr) != len(indptr):
            raise ValueError("positives and negatives must have the same number of rows")
        self.indptr, self.indices, self.num_labels = indptr, indices, num_labels
        self.neg_indptr, self.neg_indices = neg_indptr, neg_indices
        self.path = path

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], num_labels: int, negatives: Sequence[Sequence[int]] | None = None) -> "LabelStore":
        """In-memory store of per-image label lists (validated like the streaming builder)."""
        pos = _csr_from_lists(rows, num_labels)
        neg = _csr_from_lists(negatives, num_labels) if negatives is not None else None
        if neg is not None:
            if len(neg[0]) != len(pos[0]):
                raise ValueError(f"{len(rows)} rows of positives but {len(negatives)} of negatives")
            _check_disjoint(*pos, *neg)
            if len(neg[1]) == 0:
                neg = None
        return cls(*pos, num_labels, *(neg or (None, None)))

    @classmethod
    def from_dense(cls, dense: np.ndarray | torch.Tensor, negatives: np.ndarray | torch.Tensor | None = None) -> "LabelStore":
        """In-memory store of bool (N, C) positives (and known negatives)."""
        pos = _csr_from_dense(np.asarray(dense, dtype=bool))
        neg = _csr_from_dense(np.asarray(negatives, dtype=bool)) if negatives is not None else None
        if neg is not None and len(neg[1]):
            _check_disjoint(*pos, *neg)
        else:
            neg = None
        return cls(*pos, np.asarray(dense).shape[1], *(neg or (None, None)))

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def has_negatives(self) -> bool:
        return self.neg_indptr is not None

    def row(self, i: int) -> np.ndarray:
        """Positive label indices of image i (a view, O(1))."""
        return self.indices[int(self.indptr[i]) : int(self.indptr[i + 1])]

    def negatives(self, i: int) -> np.ndarray:
        """Known negative label indices of image i (a view, O(1); empty when none are known)."""
        if self.neg_indptr is None:
            return self.indices[:0]
        return self.neg_indices[int(self.neg_indptr[i]) : int(self.neg_indptr[i + 1])]

    def dense(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """bool (B, C): the positives of `rows`, densified."""
        return densify(self.indptr, self.indices, np.asarray(rows), self.num_labels)

    def dense_negatives(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """bool (B, C): the known negatives of `rows` (all False when none are known)."""
        if self.neg_indptr is None:
            return torch.from_numpy(np.zeros((len(rows), self.num_labels), dtype=bool))
        return densify(self.neg_indptr, self.neg_indices, np.asarray(rows), self.num_labels)

    def label_counts(self) -> np.ndarray:
        """int64 (C,): number of images each label is positive in."""
        counts = np.zeros(self.num_labels, dtype=np.int64)
        for i in range(0, len(self.indices), _COPY_CHUNK):
            counts += np.bincount(self.indices[i : i + _COPY_CHUNK], minlength=self.num_labels)
        return counts

    @property
    def nbytes(self) -> int:
        arrays = (self.indptr, self.indices, self.neg_indptr, self.neg_indices)
        return sum(a.nbytes for a in arrays if a is not None)

    # ------------------------------------------------------------------ disk
    def save(self, path: str | Path) -> "LabelStore":
        """Write the store to directory `path` and return it opened from there."""
        builder = LabelStoreBuilder(path, self.num_labels)
        for start in range(0, len(self), 1 << 16):
            rows = np.arange(start, min(len(self), start + (1 << 16)))
            builder.add_chunk(*row_chunk(self.indptr, self.indices, rows), *row_chunk(self.neg_indptr, self.neg_indices, rows))
        return builder.close()

    @classmethod
    def open(cls, path: str | Path) -> "LabelStore":
        """Open a store directory written by `LabelStoreBuilder` (memory-mapped, read-only)."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"no label store at {path} (meta.json is missing)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file}: label store format {meta.get('format')}, expected {FORMAT}")
        arrays = {name: load_npy(path / f"{name}.npy") for name in ("indptr", "indices")}
        if meta["neg_nnz"]:
            arrays.update({name: load_npy(path / f"{name}.npy") for name in ("neg_indptr", "neg_indices")})
        return cls(num_labels=meta["num_labels"], path=path, **arrays)

    def in_memory(self) -> "LabelStore":
        """A copy of the store held in memory (detached from its files)."""
        copy = [None if a is None else np.array(a) for a in (self.indptr, self.indices, self.neg_indptr, self.neg_indices)]
        return LabelStore(copy[0], copy[1], self.num_labels, copy[2], copy[3])

    def __reduce__(self):
        if self.path is not None:                    # workers re-open the files instead of copying them
            return (LabelStore.open, (self.path,))
        return (LabelStore, (self.indptr, self.indices, self.num_labels, self.neg_indptr, self.neg_indices))


def load_npy(path: Path) -> np.ndarray:
    """A .npy file memory-mapped read-only (empty arrays, which cannot be mapped, are read)."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.load(path, allow_pickle=False) if array.size == 0 else array


class LabelStoreBuilder:
    """Writes a label store directory by streaming rows, with bounded memory.

    Rows go to raw temporary files as they come (`add` buffers `flush_rows` rows, `add_chunk`
    takes them already flattened); `close` turns them into `.npy` files, copying in chunks, and
    writes `meta.json` last, so a directory with `meta.json` holds a complete store. Rows are
    checked: labels in [0, C), none twice, none both positive and negative.

    Args:
        path: the store directory (created; existing store files are replaced).
        num_labels: C.
        flush_rows: rows `add` buffers before writing them.
    """

    def __init__(self, path: str | Path, num_labels: int, flush_rows: int = 1 << 16) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "meta.json").unlink(missing_ok=True)
        self.num_labels, self.flush_rows = num_labels, flush_rows
        self.dtype = index_dtype(num_labels)
        names = ("indices", "lengths", "neg_indices", "neg_lengths")
        self._files = {n: open(self.path / f"{n}.raw", "wb") for n in names}
        self._count = {n: 0 for n in names}
        self._buffer: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
        self.rows = 0

    def add(self, positives: Iterable[int], negatives: Iterable[int] = ()) -> None:
        """Append one row: its positive and known negative label indices."""
        pos_len, pos, neg_len, neg = self._buffer
        before, before_neg = len(pos), len(neg)
        pos.extend(positives)
        neg.extend(negatives)
        pos_len.append(len(pos) - before)
        neg_len.append(len(neg) - before_neg)
        if len(pos_len) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        pos_len, pos, neg_len, neg = self._buffer
        if pos_len:
            self.add_chunk(np.array(pos_len), np.array(pos, dtype=np.int64), np.array(neg_len), np.array(neg, dtype=np.int64))
        self._buffer = ([], [], [], [])

    def add_chunk(self, lengths: np.ndarray, indices: np.ndarray, neg_lengths: np.ndarray | None = None, neg_indices: np.ndarray | None = None) -> None:
        """Append rows given as lengths (R,) and their concatenated label indices (sorted or not)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if neg_lengths is None:
            neg_lengths, neg_indices = np.zeros_like(lengths), np.zeros(0, dtype=np.int64)
        neg_lengths = np.asarray(neg_lengths, dtype=np.int64)
        pos, pos_keys = check_rows(lengths, indices, self.num_labels, self.rows, "positive")
        neg, neg_keys = check_rows(neg_lengths, neg_indices, self.num_labels, self.rows, "negative")
        if len(neg_keys):
            clash = np.intersect1d(pos_keys, neg_keys, assume_unique=True)
            if len(clash):
                row, label = divmod(int(clash[0]), self.num_labels)
                raise ValueError(f"row {self.rows + row}: label {label} is both positive and negative")
        self._write("lengths", lengths.astype(np.uint32))
        self._write("indices", pos)
        self._write("neg_lengths", neg_lengths.astype(np.uint32))
        self._write("neg_indices", neg)
        self.rows += len(lengths)

    def _write(self, name: str, array: np.ndarray) -> None:
        self._files[name].write(np.ascontiguousarray(array).tobytes())
        self._count[name] += len(array)

    def close(self) -> LabelStore:
        """Finish the `.npy` files and `meta.json`; returns the store opened from disk."""
        self.flush()
        for f in self._files.values():
            f.close()
        nnz, neg_nnz = self._count["indices"], self._count["neg_indices"]
        _finish_indptr(self.path / "lengths.raw", self.path / "indptr.npy", self.rows, nnz)
        finish_npy(self.path / "indices.raw", self.path / "indices.npy", self.dtype, nnz)
        if neg_nnz:
            _finish_indptr(self.path / "neg_lengths.raw", self.path / "neg_indptr.npy", self.rows, neg_nnz)
            finish_npy(self.path / "neg_indices.raw", self.path / "neg_indices.npy", self.dtype, neg_nnz)
        else:
            for name in ("neg_lengths.raw", "neg_indices.raw", "neg_indptr.npy", "neg_indices.npy"):
                (self.path / name).unlink(missing_ok=True)
        meta = {"format": FORMAT, "num_rows": self.rows, "num_labels": self.num_labels, "nnz": nnz, "neg_nnz": neg_nnz}
        tmp = self.path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.path / "meta.json")
        return LabelStore.open(self.path)

    def abort(self) -> None:
        """Close and delete what was written (a failed build leaves no half store behind)."""
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.path, ignore_errors=True)


def check_rows(lengths: np.ndarray, indices: np.ndarray, num_labels: int, first_row: int = 0, kind: str = "positive") -> tuple[np.ndarray, np.ndarray]:
    """Validate rows given as lengths (R,) and concatenated label indices; sort within rows.

    Returns the indices sorted within rows in the store's dtype, and their int64 keys
    `row * C + label`. Errors name the row (counted from `first_row`) and the label.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if (len(lengths) and lengths.min() < 0) or lengths.sum() != len(indices):
        raise ValueError(f"rows {first_row}..: {kind} lengths do not add up to the {len(indices)} indices given")
    bad = np.flatnonzero((indices < 0) | (indices >= num_labels))
    if len(bad):
        row = first_row + int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        raise ValueError(f"row {row}: {kind} label index {indices[bad[0]]} outside [0, {num_labels})")
    keys = np.repeat(np.arange(len(lengths), dtype=np.int64) * num_labels, lengths) + indices
    steps = np.diff(keys)
    if len(steps) and steps.min() <= 0:                      # not sorted within rows: sort, look for repeats
        keys.sort()
        repeated = np.flatnonzero(np.diff(keys) == 0)
        if len(repeated):
            row, label = divmod(int(keys[repeated[0]]), num_labels)
            raise ValueError(f"row {first_row + row}: {kind} label {label} is listed twice")
        indices = keys % num_labels
    return indices.astype(index_dtype(num_labels)), keys


def _npy_header(f, dtype: np.dtype, n: int) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)})


def finish_npy(raw: Path, out: Path, dtype: np.dtype, n: int) -> None:
    """raw file of n `dtype` values -> .npy file, copied in chunks; the raw file is deleted."""
    with open(raw, "rb") as src, open(out, "wb") as dst:
        _npy_header(dst, dtype, n)
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
    raw.unlink()


def _finish_indptr(raw: Path, out: Path, rows: int, nnz: int) -> None:
    """raw uint32 row lengths -> indptr .npy (running sums, chunk by chunk); the raw file is deleted."""
    dtype = indptr_dtype(nnz)
    with open(raw, "rb") as src, open(out, "wb") as dst:
        _npy_header(dst, dtype, rows + 1)
        dst.write(np.zeros(1, dtype=dtype).tobytes())
        total = 0
        while chunk := src.read(4 * _COPY_CHUNK):
            ends = np.cumsum(np.frombuffer(chunk, dtype=np.uint32), dtype=np.int64) + total
            dst.write(ends.astype(dtype).tobytes())
            total = int(ends[-1])
    raw.unlink()


def _csr_from_lists(rows: Sequence[Sequence[int]], num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(lengths.sum()))
    indices, _ = check_rows(lengths, flat, num_labels)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(indptr_dtype(len(indices)))
    return indptr, indices


def _csr_from_dense(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=dense.shape[0]))]).astype(indptr_dtype(len(cols)))
    return indptr, cols.astype(index_dtype(dense.shape[1]))


def _check_disjoint(indptr: np.ndarray, indices: np.ndarray, neg_indptr: np.ndarray, neg_indices: np.ndarray) -> None:
    C = 1 << 32
    keys = [np.repeat(np.arange(len(p) - 1, dtype=np.int64) * C, np.diff(p.astype(np.int64))) + i for p, i in ((indptr, indices), (neg_indptr, neg_indices))]
    clash = np.intersect1d(*keys)
    if len(clash):
        row, label = divmod(int(clash[0]), C)
        raise ValueError(f"row {row}: label {label} is both positive and negative")


def row_chunk(indptr: np.ndarray | None, indices: np.ndarray | None, rows: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(lengths, concatenated indices) of consecutive `rows` of a CSR pair (None, None if absent)."""
    if indptr is None:
        return None, None
    start, end = int(indptr[rows[0]]), int(indptr[rows[-1] + 1])
    return np.diff(indptr[rows[0] : rows[-1] + 2].astype(np.int64)), indices[start:end]
