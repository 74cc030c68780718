"""The GPU benchmark: one prepared script for a lent GPU machine, run as it is.

    python benchmarks/gpu_suite.py                        # on a GPU machine: about 6-8 minutes
    python benchmarks/gpu_suite.py --out /some/dir        # write <machine>-gpu.json/.md there
    python benchmarks/gpu_suite.py --smoke                # tiny, on CPU: checks that every part runs

Parts (each a figure against a baseline measured in the same run, alternating rounds, median and range):

1. **ResNet-50 at 224 px, mlml vs a bare loop on this GPU.** mlml: `Trainer.train_epoch` with
   `model.backbone = resnet50` (ImageNet stem), synthetic 224 px images, batch 256, loader workers
   with pinned memory, persistent workers and non-blocking copies, bf16 autocast, channels_last,
   fused AdamW (all the trainer's defaults on a GPU). Bare: the same model, optimiser and loss,
   bf16 autocast and channels_last, on batches already on the GPU. Target: >= 0.97.
   Also with `model.compile = true` (torch.compile) unless `--no-compile`.
2. **Against the published reference**: NVIDIA's DALI ResNet-50 mixed-precision training figure,
   about 2,470 images/s on one A100 (the GPU class named in the issue), and the fraction of this
   GPU's dense bf16 peak that the measured rate reaches (ResNet-50 training ~ 3 x 4.1 GMAC = 24.6
   GFLOP per 224 px image).
3. **Full profile wall time**: `experiments/configs/full.toml` trained for `--full-epochs` epochs
   (validation included), extrapolated linearly to its 40 epochs (stated), for `mlml reproduce --list`.
4. **JPEG decoding on the GPU**: `torchvision.io.decode_jpeg(..., device="cuda")` on batches of
   400x300 JPEGs against the CPU decode of `mlml.data.image_files.decode_image` (one core, times the
   machine's cores for the whole CPU).

Writes `<out>/<machine>-gpu.json` and `.md` (`--smoke`: `<machine>-gpu-smoke.*`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, ab_rounds, fmt_ratio, machine, machine_name  # noqa: E402
from trainer_overhead import BareLoop, MlmlEpochs, make_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DALI_A100_IMAGES_PER_S = 2470.0            # NVIDIA DALI ResNet-50 mixed precision, one A100 (issue 17)
RESNET50_TRAIN_FLOP_PER_IMAGE = 3 * 2 * 4.1e9
# Dense bf16 tensor peak (FLOP/s) by GPU name (vendor data sheets, SXM parts; PCIe parts are lower).
BF16_PEAK = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l40s": 362e12, "l40": 181e12, "a10": 125e12,
             "l4": 121e12, "b200": 2250e12}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class DeviceBareLoop(BareLoop):
    """BareLoop with the batches on the device and the step under the trainer's autocast."""

    def __init__(self, trainer, device: torch.device) -> None:
        super().__init__(trainer)
        self.device, self.amp = device, trainer.amp_dtype
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in self.batches]

    def step(self, i: int) -> None:
        b = self.batches[i % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.model(b["image"])["logits"].float()
        self.loss(logits, b["targets"], b["observed"]).backward()
        self.opt.step()

    def __call__(self) -> dict[str, float]:
        sync()
        rates = super().__call__()
        return rates


class SyncedEpochs(MlmlEpochs):
    def __call__(self) -> dict[str, float]:
        sync()
        start = time.perf_counter()
        t = self.t
        t.train_epoch(self.total, self.warmup)
        sync()
        rate = t.steps_per_epoch * t.batch_per_rank / (time.perf_counter() - start)
        t.epoch, t.step_in_epoch = t.epoch + 1, 0
        return rate


def timed_bare(bare: DeviceBareLoop) -> float:
    sync()
    start = time.perf_counter()
    for i in range(len(bare.batches)):
        bare.step(i)
    sync()
    return sum(len(b["image"]) for b in bare.batches) / (time.perf_counter() - start)


def resnet_vs_bare(args: argparse.Namespace, compile_model: bool, tmp: str) -> dict:
    over = [f"model.backbone={args.backbone}", f"model.stem={args.stem}", f"data.synthetic.image_size={args.size}",
            f"run.device={args.device}", f"data.num_workers={args.workers}", "run.progress=false", "optim.amp=auto",
            f"model.compile={str(compile_model).lower()}"]
    trainer = make_trainer(tmp, args.steps, args.batch, over)
    mlml, bare = SyncedEpochs(trainer), DeviceBareLoop(trainer, trainer.device)
    start = time.perf_counter()
    mlml(); timed_bare(bare)                                      # warm-up: cudnn autotuning, compilation
    warmup_s = time.perf_counter() - start
    r = ab_rounds(mlml, lambda: timed_bare(bare), args.rounds)
    trainer.logger.close()
    fused = any(g.get("fused") for g in trainer.optimizer.param_groups)
    return {"mlml_images_per_s": r["a"], "bare_images_per_s": r["b"], "ratio": r["ratio"], "warmup_s": warmup_s,
            "compile": compile_model, "amp_dtype": str(trainer.amp_dtype), "fused_adamw": fused,
            "pin_memory": trainer.train_loader.pin_memory, "workers": args.workers,
            "persistent_workers": trainer.train_loader.persistent_workers,
            "channels_last": trainer.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            if hasattr(trainer.model.backbone, "conv1") else None}


def gpu_class(name: str) -> str | None:
    low = name.lower()
    for key in sorted(BF16_PEAK, key=len, reverse=True):
        if key in low:
            return key
    return None


def full_profile(args: argparse.Namespace, tmp: str) -> dict:
    """`mlml train` on the full profile for a few epochs; its time per epoch x 40."""
    from mlml.config import load_config
    from mlml.trainer import train

    over = [f"optim.epochs={args.full_epochs}", f"run.device={args.device}", "run.progress=false",
            f"data.num_workers={args.workers}"]
    if args.smoke:
        over += ["data.n_train=256", "data.n_val=128", "data.n_test=128", "data.synthetic.image_size=16",
                 "model.backbone=small_cnn", "data.batch_size=64"]
    cfg = load_config(ROOT / "experiments/configs/full.toml", over)
    full_epochs = load_config(ROOT / "experiments/configs/full.toml", []).optim.epochs
    start = time.perf_counter()
    metrics = train(cfg, Path(tmp) / "full")
    wall = time.perf_counter() - start
    return {"epochs_run": args.full_epochs, "wall_s": wall, "train_seconds": metrics["train_seconds"],
            "full_profile_epochs": full_epochs,
            "estimated_full_profile_wall_min": wall / args.full_epochs * full_epochs / 60,
            "note": "wall time of the run (data build, epochs with validation, final evaluation) divided by the "
                    "epochs run, times the profile's epochs: an estimate; the fixed costs are counted once per epoch"}


def jpeg_decode(args: argparse.Namespace, tmp: str) -> dict:
    """Images/s decoding 400x300 JPEGs to `--size` px: CPU (PIL, one core) vs torchvision on the device."""
    import torchvision
    from torchvision.io import decode_jpeg

    from folder_loading import write_photos
    from mlml.data.image_files import decode_image

    root = Path(tmp) / "photos"
    write_photos(root, args.jpegs, classes=4)
    files = sorted(root.rglob("*.JPEG"))
    start = time.perf_counter()
    for f in files:
        decode_image(f, args.size)
    cpu_rate = len(files) / (time.perf_counter() - start)
    data = [torchvision.io.read_file(str(f)) for f in files]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rates = []
    for _ in range(1 + args.rounds):
        sync()
        start = time.perf_counter()
        for i in range(0, len(data), args.batch):
            images = decode_jpeg(data[i : i + args.batch], device=device)          # list of (3, 300, 400) uint8
            batch = torch.stack(images).float()
            torch.nn.functional.interpolate(batch, size=(args.size, args.size), mode="bilinear", antialias=True)
        sync()
        rates.append(len(data) / (time.perf_counter() - start))
    gpu_rates = sorted(rates[1:])
    return {"jpegs": len(files), "cpu_pil_images_per_s_one_core": cpu_rate, "cpu_cores": os.cpu_count(),
            "cpu_pil_images_per_s_all_cores_estimate": cpu_rate * (os.cpu_count() or 1),
            "device": device, "device_decode_images_per_s_median": gpu_rates[len(gpu_rates) // 2],
            "note": "device rate: decode_jpeg on batches of --batch files + resize on the device, files read in memory"}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# GPU benchmark — {m['name']}{' (smoke run on CPU: figures mean nothing)' if res['smoke'] else ''}", "",
             f"{m['gpu'] or 'no GPU'}; {m['cpu']}, {m['cores']} cores; torch {m['torch']}; commit {m['commit']}; {m['date']}", "",
             "| figure | median (range) |", "|---|---|"]
    for key, r in res["resnet50"].items():
        lines.append(f"| {key}: mlml / bare loop (target >= 0.97) | {fmt_ratio(r['ratio'])} |")
        lines.append(f"| {key}: mlml images/s; bare images/s | {r['mlml_images_per_s']['median']:.0f}; {r['bare_images_per_s']['median']:.0f} |")
    ref = res.get("reference", {})
    if ref:
        lines.append(f"| mlml / DALI A100 reference (2,470 images/s) | {ref['fraction_of_dali_a100']:.2f} |")
        if ref.get("fraction_of_bf16_peak") is not None:
            lines.append(f"| fraction of this GPU's dense bf16 peak ({ref['gpu_class']}) | {ref['fraction_of_bf16_peak']:.3f} |")
    if "full_profile" in res:
        f = res["full_profile"]
        lines.append(f"| full profile: {f['epochs_run']} epoch(s) wall s; estimated {f['full_profile_epochs']} epochs | "
                     f"{f['wall_s']:.0f} s; {f['estimated_full_profile_wall_min']:.1f} min |")
    if "jpeg" in res:
        j = res["jpeg"]
        lines.append(f"| JPEG decode images/s: {j['device']} batched; CPU one core (x{j['cpu_cores']} cores) | "
                     f"{j['device_decode_images_per_s_median']:.0f}; {j['cpu_pil_images_per_s_one_core']:.0f} "
                     f"({j['cpu_pil_images_per_s_all_cores_estimate']:.0f}) |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks that every part runs")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--stem", default="imagenet")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per round (one epoch)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--full-epochs", type=int, default=1)
    p.add_argument("--no-full", action="store_true")
    p.add_argument("--jpegs", type=int, default=1024)
    return p


def smoke_args(args: argparse.Namespace) -> None:
    args.backbone, args.stem, args.size, args.batch, args.steps, args.rounds = "small_cnn", "small", 16, 16, 2, 2
    args.workers, args.device, args.jpegs, args.no_compile = 1, "cpu", 16, True


def main() -> None:
    args = parser().parse_args()
    if args.smoke:
        smoke_args(args)
    elif not torch.cuda.is_available():
        sys.exit("no GPU here: run with --smoke to check the script on CPU")
    torch.backends.cudnn.benchmark = True
    result: dict = {"machine": machine(), "smoke": args.smoke, "args": vars(args), "resnet50": {}}
    tmp = tempfile.mkdtemp(prefix="mlml-gpu-suite-")
    start = time.perf_counter()
    try:
        for compile_model in ([False] if args.no_compile else [False, True]):
            key = "eager" if not compile_model else "compiled"
            result["resnet50"][key] = resnet_vs_bare(args, compile_model, f"{tmp}/{key}")
            print(f"{args.backbone} {args.size}px {key}: mlml / bare = {fmt_ratio(result['resnet50'][key]['ratio'])}, "
                  f"{result['resnet50'][key]['mlml_images_per_s']['median']:.0f} images/s", flush=True)
        best = max(r["mlml_images_per_s"]["median"] for r in result["resnet50"].values())
        cls = gpu_class(result["machine"]["gpu"] or "")
        result["reference"] = {"mlml_best_images_per_s": best, "dali_a100_images_per_s": DALI_A100_IMAGES_PER_S,
                               "fraction_of_dali_a100": best / DALI_A100_IMAGES_PER_S, "gpu_class": cls,
                               "fraction_of_bf16_peak": best * RESNET50_TRAIN_FLOP_PER_IMAGE / BF16_PEAK[cls] if cls else None}
        if not args.no_full:
            result["full_profile"] = full_profile(args, tmp)
            print(f"full profile: {result['full_profile']['estimated_full_profile_wall_min']:.1f} min (estimated)", flush=True)
        result["jpeg"] = jpeg_decode(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["suite_wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{machine_name()}-gpu{'-smoke' if args.smoke else ''}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
