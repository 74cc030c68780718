"""Training and evaluation throughput of the real DDP trainer step at 1 and 2 processes (torchrun).

    python benchmarks/ddp_throughput.py                     # CPU: 1 and 2 processes; 1 GPU if there is one
    python benchmarks/ddp_throughput.py --procs 1 2 4 --steps 40
    torchrun --nproc-per-node=8 benchmarks/ddp_throughput.py --device cuda   # a multi-GPU machine

Without torchrun in the environment the script launches `torchrun --standalone` itself for each
process count and prints one line per measurement; under torchrun it is one of the workers.
Each measurement is the median of `--repeats` launches. Two series: the global batch fixed
(`data.batch_size`, as in training: a step at N processes does the same work as at 1, split N ways)
and scaled (N x the batch: each process keeps its batch), with speedup and scaling efficiency
against 1 process (on CPU the processes split the same cores, so the ideal speedup there is 1). CPU processes share the machine's cores
(threads per process = cores // N). Numbers include data loading, DDP's gradient all-reduce, the
buffer broadcast and the loss-part logging collective. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """One rank: build the trainer, time `args.steps` optimiser steps and one gathered evaluation."""
    sys.path.insert(0, str(ROOT))
    from mlml.config import load_config
    from mlml.data.dataset import epoch_sampler
    from mlml.distributed import barrier, init_distributed
    from mlml.evaluation import predict
    from mlml.trainer import Trainer

    overrides = [f"model.backbone={args.backbone}", f"data.synthetic.image_size={args.image_size}",
                 f"data.batch_size={args.batch_size}", f"data.n_train={args.batch_size * (args.steps + 3)}",
                 f"run.device={args.device}", "run.progress=false"]
    cfg = load_config(ROOT / "experiments/configs/quick.toml", overrides)
    info = init_distributed(cfg.run.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), info)
        epoch_sampler(trainer.train_loader).set_epoch(0)
        it = iter(trainer.train_loader)
        for _ in range(3):                                   # warm-up (allocator, DDP buckets)
            trainer.train_step(next(it))
        sync(trainer.device)
        barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(next(it))
        sync(trainer.device)
        barrier()
        train_rate = args.steps * cfg.data.batch_size / (time.perf_counter() - start)
        start = time.perf_counter()
        scores, _ = predict(trainer.model, trainer.eval_loaders["val"], trainer.device, trainer.amp_dtype)
        sync(trainer.device)
        eval_rate = len(scores) / (time.perf_counter() - start)
    if info.is_main:
        device = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads/process"
        print(json.dumps({"processes": info.world_size, "device": device, "backbone": args.backbone,
                          "image_size": args.image_size, "global_batch": cfg.data.batch_size,
                          "train_images_per_s": round(train_rate, 1), "eval_images_per_s": round(eval_rate, 1)}), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, procs: int, device: str) -> str:
    """`args.repeats` launches; the median images/s (and every value), as one JSON line."""
    runs = [json.loads(launch(args, procs, device)) for _ in range(args.repeats)]
    out = runs[0]
    for key in ("train_images_per_s", "eval_images_per_s"):
        values = sorted(r[key] for r in runs)
        out[key] = values[len(values) // 2]
        out[key.replace("_per_s", "_per_s_all")] = values
    return json.dumps(out)


def threads_per_process(args: argparse.Namespace, procs: int, device: str) -> int:
    return (args.threads or max(1, (os.cpu_count() or 1) // procs)) if device == "cpu" else 1


def launch(args: argparse.Namespace, procs: int, device: str) -> str:
    """Run this script under `torchrun --standalone --nproc-per-node=procs`; return rank 0's line."""
    threads = threads_per_process(args, procs, device)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", __file__,
           "--backbone", args.backbone, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--device", device, "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return [line for line in out.stdout.splitlines() if line.startswith("{")][-1]


def scaling(args: argparse.Namespace, device: str, procs: list[int]) -> dict:
    """Images/s at each process count with the global batch fixed (strong scaling: the same optimiser
    steps, each split N ways) and scaled (weak scaling: N x the batch, per-process batch fixed), and
    the scaling efficiency of each against 1 process.

    Efficiency = rate_N / (rate_1 x hardware_N), hardware_N = N on GPUs (one each), and for CPU
    processes the ratio of the cores they use (N x threads each, against 1 process's threads):
    1 when the processes split the same cores (`--threads 0`), N with `--threads 1`.
    """
    out = {"device": device, "base_global_batch": args.batch_size, "fixed": {}, "scaled": {}}
    base = args.batch_size
    for mode in ("fixed", "scaled"):
        for n in procs:
            if mode == "scaled" and n == procs[0] and procs[0] == 1:
                out["scaled"][n] = out["fixed"][n]               # the same measurement at 1 process
                continue
            args.batch_size = base * (n if mode == "scaled" else 1)
            line = json.loads(measure(args, n, device))
            args.batch_size = base
            out[mode][n] = line
            print(json.dumps({"mode": mode, **line}), flush=True)
        one = out[mode][procs[0]]["train_images_per_s"]
        for n in procs:
            hw = n * threads_per_process(args, n, device) / (procs[0] * threads_per_process(args, procs[0], device))
            rec = out[mode][n]
            rec["speedup"] = rec["train_images_per_s"] / one
            rec["efficiency"] = rec["speedup"] / hw
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128, help="global batch (data.batch_size); 'scaled' uses N x this")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="CPU process counts to measure")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores // processes)")
    p.add_argument("--repeats", type=int, default=3, help="launches per measurement (the median is reported)")
    p.add_argument("--device", default="auto", help="worker mode: cpu | cuda | auto")
    p.add_argument("--json", default="", help="also write the scaling summary to this file")
    args = p.parse_args()
    if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ:
        worker(args)
        return
    result = {"cpu": scaling(args, "cpu", args.procs)}
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        result["cuda"] = scaling(args, "cuda", sorted({1, torch.cuda.device_count()}))
    elif torch.cuda.is_available():
        result["cuda"] = {"fixed": {1: json.loads(measure(args, 1, "cuda"))}, "note": "one GPU: no scaling to measure"}
    else:
        print("# no GPU here: GPU figures need one (and >= 2 GPUs for DDP scaling).", flush=True)
    for dev, r in result.items():
        for mode in ("fixed", "scaled"):
            for n, rec in r.get(mode, {}).items():
                if "efficiency" in rec:
                    print(f"{dev} {mode:>5} global batch, {n} process(es): {rec['train_images_per_s']:.0f} images/s, "
                          f"speedup {rec['speedup']:.2f}, efficiency {rec['efficiency']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
