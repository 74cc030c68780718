"""Data: loader images/s by worker count against what training consumes, on the same machine.

    python benchmarks/data_rates.py                       # JPEG folder and synthetic, workers 0 1 2, 32 px
    python benchmarks/data_rates.py --size 64 --photos 2000 --workers 0 2 4

The **consumption rate** is the bare training loop of the default model (the quick profile: small
CNN, batch 128) at this image size, in images/s with `--threads` torch threads (default 1: on a
machine loaded by other processes a multi-threaded step waits for its slowest thread and its rate
means little; on an idle machine pass the core count). Each **loader rate**
is one epoch of the real training loader (`data.loader("train", ...)`: sampler, per-sample flip_crop,
collate with label densification; persistent workers), from

* `folder`: ImageNet-like 400x300 JPEG photos (written once by `folder_loading.write_photos`),
  decoded and resized to the image size per item;
* `synthetic`: the built-in generator, whose images the pipeline renders once and caches (the
  loader then augments from memory); its rendering rate (`SyntheticSource.images`) is reported too.

Loader epochs and training rounds alternate; the figure is loader / consumption per round (median,
range). Target >= 2 (the training step never waits for data). Workers share the machine's cores
with the training process in real use; here they run alternately, so a ratio says what the loader
could feed, not what it feeds while training runs beside it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from folder_loading import write_photos  # noqa: E402
from harness import ab_rounds, fmt_ratio  # noqa: E402
from trainer_overhead import BareLoop, make_trainer  # noqa: E402

from mlml.config import load_config  # noqa: E402
from mlml.data.pipeline import build_data  # noqa: E402
from mlml.data.synthetic import SyntheticConfig, SyntheticSource  # noqa: E402


class LoaderEpoch:
    """One epoch of a training loader per call; returns images/s."""

    def __init__(self, overrides: list[str]) -> None:
        cfg = load_config(None, overrides)
        self.data = build_data(cfg.data)
        self.loader = self.data.loader("train", {"image": "flip_crop"}, seed=0)
        self.epoch = 0
        self()                                               # starts the persistent workers

    def __call__(self) -> float:
        self.loader.sampler.set_epoch(self.epoch)
        self.epoch += 1
        start, images = time.perf_counter(), 0
        for batch in self.loader:
            images += len(batch["index"])
        return images / (time.perf_counter() - start)


def consumption(size: int, batch: int, steps: int, tmp: str) -> BareLoop:
    """The bare loop of the quick profile's model at `size` px (images/s per call)."""
    trainer = make_trainer(tmp, steps, batch, [f"data.synthetic.image_size={size}"])
    trainer.logger.close()
    bare = BareLoop(trainer)
    bare()
    return bare


def render_rate(size: int, n: int = 2048, batch: int = 256) -> float:
    """Synthetic images rendered per second (batched `images()`), the cache's build rate."""
    source = SyntheticSource(SyntheticConfig(image_size=size), n, seed=0)
    source.images(np.arange(batch))
    start = time.perf_counter()
    for first in range(0, n, batch):
        source.images(np.arange(first, min(first + batch, n)))
    return n / (time.perf_counter() - start)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="image size (the default model's: 32)")
    p.add_argument("--photos", type=int, default=1024, help="JPEG photos in the folder (one epoch each round)")
    p.add_argument("--synthetic", type=int, default=4096, help="synthetic training images (one epoch each round)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="training steps per consumption round")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--dir", default="")
    return p


def run(args: argparse.Namespace) -> dict:
    base = Path(args.dir or tempfile.mkdtemp(prefix="mlml-data-bench-"))
    torch.set_num_threads(args.threads)
    out: dict = {"image_size": args.size, "batch": args.batch, "rounds": args.rounds, "training_threads": args.threads}
    try:
        root = base / "photos"
        start = time.perf_counter()
        if not root.exists():
            out["jpeg_kb"] = write_photos(root, args.photos, classes=16)
        out["photos"], out["photo_write_s"] = args.photos, time.perf_counter() - start
        out["synthetic_render_images_per_s"] = render_rate(args.size)
        train = consumption(args.size, args.batch, args.steps, str(base / "run"))
        sources = {
            "folder": ["data.source=folder", f"data.folder.root={root}", f"data.store={base / 'store'}", f"data.folder.image_size={args.size}",
                       f"data.n_train={args.photos - 2}", "data.n_val=1", "data.n_test=1"],
            "synthetic": ["data.source=synthetic", f"data.synthetic.image_size={args.size}", f"data.n_train={args.synthetic}",
                          "data.n_val=1", "data.n_test=1"],
        }
        for name, over in sources.items():
            out[name] = {}
            for w in args.workers:
                loader = LoaderEpoch([*over, f"data.batch_size={args.batch}", f"data.num_workers={w}"])
                r = ab_rounds(loader, train, args.rounds)
                out[name][f"workers_{w}"] = {"loader_images_per_s": r["a"], "training_images_per_s": r["b"],
                                             "ratio_to_training": r["ratio"]}
                print(f"  data {name:<9} workers={w}: {r['a']['median']:7.0f} images/s = {fmt_ratio(r['ratio'])} x training "
                      f"({r['b']['median']:.0f} images/s)", flush=True)
                del loader
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return out


if __name__ == "__main__":
    import json
    print(json.dumps(run(parser().parse_args()), indent=2, default=float))
