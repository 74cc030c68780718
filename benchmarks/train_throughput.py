"""Training and evaluation throughput of the real trainer step (data loading included).

    python benchmarks/train_throughput.py [--backbone small_cnn] [--image-size 32] [--steps 30]

Prints images/s for training steps (loader + forward + backward + optimiser) and for evaluation.
A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mlml.config import load_config
from mlml.distributed import DistInfo
from mlml.evaluation import predict
from mlml.trainer import Trainer


def measure(overrides: list[str], steps: int) -> tuple[float, float]:
    cfg = load_config(Path(__file__).parent.parent / "experiments/configs/quick.toml", ["data.synthetic.image_size=32", *overrides, "run.progress=false"])   # 32 px: the README's figures
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), DistInfo())
        trainer.train_loader.sampler.set_epoch(0)
        it = iter(trainer.train_loader)
        trainer.train_step(next(it))                      # warm-up
        start, n = time.perf_counter(), 0
        for _ in range(steps):
            batch = next(it)
            trainer.train_step(batch)
            n += len(batch["index"])
        train_rate = n / (time.perf_counter() - start)
        start = time.perf_counter()
        scores, _ = predict(trainer.model, trainer.eval_loaders["val"], trainer.device)
        eval_rate = len(scores) / (time.perf_counter() - start)
    return train_rate, eval_rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"model.backbone={args.backbone}", f"data.synthetic.image_size={args.image_size}",
                 "data.n_train=6000", f"run.device={args.device}"]
    train_rate, eval_rate = measure(overrides, args.steps)
    device = torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"{args.backbone} {args.image_size}px on {device}: train {train_rate:,.0f} img/s, eval {eval_rate:,.0f} img/s")


if __name__ == "__main__":
    main()
