"""Label store at scale: build 12M images x 11K labels by streaming, then time lookups.

    python benchmarks/label_store.py                       # 12,000,000 x 11,000, ~3 positives each
    python benchmarks/label_store.py --n 1000000 --dir /tmp/mlml-store-bench

Rows are generated in chunks (1 + Poisson(2.15) labels per image, Zipf-distributed label frequencies)
and fed to `LabelStoreBuilder.add_chunk`, the same builder the annotation parser streams into
(its per-row `add` path is timed separately on `--row-path` rows, and the whole annotation parser
on a JSONL file of `--annotation-lines` lines). The build runs in a fresh
process so its peak RSS is its own. Reports build time, peak memory, size on disk, the opened
store's size in memory, per-sample lookup rate and batch densification time. The store is deleted
at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def label_rows(n: int, c: int, chunk: int, seed: int):
    """Chunks (lengths, indices) of n rows: 1 + Poisson(2.15) distinct labels, Zipf(1.1) frequencies."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, c + 1) ** 1.1
    cdf = np.cumsum(weights / weights.sum())
    for start in range(0, n, chunk):
        r = min(chunk, n - start)
        want = 1 + rng.poisson(2.15, r)
        labels = np.minimum(np.searchsorted(cdf, rng.random(int(want.sum()))), c - 1)
        keys = np.unique(np.repeat(np.arange(r, dtype=np.int64) * c, want) + labels)   # drop repeats in a row
        yield np.bincount(keys // c, minlength=r), keys % c


def build(args: argparse.Namespace, out: "mp.Queue") -> None:
    from mlml.data.label_store import LabelStoreBuilder

    base = rss_mb()
    start = time.perf_counter()
    builder = LabelStoreBuilder(args.dir, args.c)
    nnz = 0
    for lengths, indices in label_rows(args.n, args.c, args.chunk, seed=0):
        builder.add_chunk(lengths, indices)
        nnz += len(indices)
    builder.close()
    seconds = time.perf_counter() - start
    out.put({"build_s": seconds, "nnz": nnz, "base_rss_mb": base, "peak_rss_mb": peak_rss_mb()})


def row_path(args: argparse.Namespace) -> float:
    """Rows/s through the per-row `add` path (what the annotation parser uses)."""
    from mlml.data.label_store import LabelStoreBuilder

    rows = [ix.tolist() for lengths, ix in label_rows(args.row_path, args.c, args.row_path, seed=1) for ix in np.split(ix, np.cumsum(lengths)[:-1])]
    path = Path(args.dir + "-rows")
    start = time.perf_counter()
    builder = LabelStoreBuilder(path, args.c)
    for r in rows:
        builder.add(r)
    builder.close()
    rate = len(rows) / (time.perf_counter() - start)
    shutil.rmtree(path)
    return rate


def annotation_parse(args: argparse.Namespace) -> dict:
    """Lines/s of indexing a JSONL annotation file (parse, check, stream to the store)."""
    from mlml.data.annotations import AnnotationSource

    tmp = Path(args.dir + "-ann")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "labels.txt").write_text("\n".join(f"label{c:05d}" for c in range(args.c)) + "\n")
    with open(tmp / "a.jsonl", "w") as f:
        for lengths, ix in label_rows(args.annotation_lines, args.c, 1 << 16, seed=2):
            names = np.char.add("label", np.char.zfill(ix.astype(str), 5))
            for i, row in enumerate(np.split(names, np.cumsum(lengths)[:-1])):
                f.write(json.dumps({"path": f"train/{i:08d}.jpg", "positives": row.tolist()}) + "\n")
    mb = (tmp / "a.jsonl").stat().st_size / 2**20
    start = time.perf_counter()
    source = AnnotationSource(tmp / "a.jsonl", tmp / "labels.txt", None, 64, store=tmp / "store")
    seconds = time.perf_counter() - start
    assert len(source) == args.annotation_lines
    shutil.rmtree(tmp)
    return {"annotation_lines": args.annotation_lines, "annotation_file_mb": mb, "annotation_index_s": seconds,
            "annotation_lines_per_s": args.annotation_lines / seconds}


def lookups(args: argparse.Namespace) -> dict:
    import torch

    from mlml.data.label_store import LabelStore

    base = rss_mb()
    store = LabelStore.open(args.dir)
    rng = np.random.default_rng(0)
    counts = store.label_counts()                                  # touches every index page
    _ = int(np.asarray(store.indptr[:: 1024]).sum())
    touched = rss_mb() - base
    idx = rng.integers(0, len(store), 200_000)
    start = time.perf_counter()
    for i in idx:
        store.row(i)
    per_sample = len(idx) / (time.perf_counter() - start)
    times = []
    for _ in range(args.batches):
        rows = rng.integers(0, len(store), args.batch)
        t = time.perf_counter()
        dense = store.dense(rows)
        neg = store.dense_negatives(rows)
        times.append(time.perf_counter() - t)
    assert dense.shape == (args.batch, args.c) and dense.dtype == torch.bool and not neg.any()
    return {
        "positives_per_image": float(store.indptr[-1]) / len(store),
        "most_frequent_label_images": int(counts.max()),
        "store_nbytes_mb": store.nbytes / 2**20,
        "rss_after_touching_all_mb": touched,
        "row_lookups_per_s": per_sample,
        "batch_densify_ms_median": 1000 * float(np.median(times)),
        "batch_densify_ms_p95": 1000 * float(np.percentile(times, 95)),
        "indptr_dtype": str(store.indptr.dtype),
        "indices_dtype": str(store.indices.dtype),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=12_000_000)
    p.add_argument("--c", type=int, default=11_000)
    p.add_argument("--chunk", type=int, default=1 << 18, help="rows generated and written per step")
    p.add_argument("--dir", default="/tmp/mlml-store-bench")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--row-path", type=int, default=500_000, help="rows timed through the per-row add (0: skip)")
    p.add_argument("--annotation-lines", type=int, default=1_000_000, help="JSONL lines indexed by the annotation parser (0: skip)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=build, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    disk = sum(f.stat().st_size for f in Path(args.dir).iterdir())
    result.update(n=args.n, c=args.c, disk_mb=disk / 2**20, build_extra_rss_mb=result["peak_rss_mb"] - result["base_rss_mb"])
    result.update(lookups(args))
    if args.row_path:
        result["per_row_add_rows_per_s"] = row_path(args)
    if args.annotation_lines:
        result.update(annotation_parse(args))
    if not args.keep:
        shutil.rmtree(args.dir)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
