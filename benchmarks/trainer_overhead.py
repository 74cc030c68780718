"""Trainer overhead: mlml's training steps against a bare hand-written loop, and each method's step cost.

    python benchmarks/trainer_overhead.py                     # quick profile model, 1 thread, 7 rounds
    python benchmarks/trainer_overhead.py --threads 2 --rounds 9
    python benchmarks/trainer_overhead.py --profile           # torch.profiler + cProfile of both loops

**mlml** is `Trainer.train_epoch` as `mlml train` runs it: the loader (sampler, per-sample
augmentation, collate with label densification), the lr schedule, `train_step` (autocast context,
loss parts, optimiser), the method's hooks, TensorBoard scalars and the progress bar. **bare** is
what a user writes by hand: the same model (same initial weights), the same AdamW parameter groups,
the same loss, on the same batches already collated in memory:

    for b in batches: opt.zero_grad(); loss_fn(model(b["image"])["logits"], b["targets"], b["observed"]).backward(); opt.step()

A round is one mlml epoch of `--steps` steps with one bare step right after each mlml step (paired
step by step, so that load from other processes falls on both); the figure is the per-round ratio
of images/s, mlml / bare (median and range), by wall time and by this process's CPU time. Method costs: each registered method's
images/s relative to `supervised` in the same alternating way (a ratio < 1 = slower than supervised).
Precision: `optim.amp = "on"` (bf16 autocast on the CPU) against fp32, same alternating way, at
widths 24 and 32 (fast only where the CPU has bf16 units: AVX512-BF16, AMX).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Clock, ab_rounds, fmt_ratio, summary  # noqa: E402

from mlml.config import load_config  # noqa: E402
from mlml.distributed import DistInfo  # noqa: E402
from mlml.losses import get_loss  # noqa: E402
from mlml.methods import METHODS  # noqa: E402
from mlml.provenance import cpu_bf16_units  # noqa: E402
from mlml.trainer import Trainer, build_optimizer  # noqa: E402

QUICK = Path(__file__).resolve().parent.parent / "experiments/configs/quick.toml"


def make_trainer(tmp: str, steps: int, batch: int, overrides: list[str] = ()) -> Trainer:
    """The quick profile's trainer with an epoch of `steps` steps (small val/test splits)."""
    cfg = load_config(QUICK, ["data.synthetic.image_size=32",          # the README's figures: 32 px (the profile: 16)
                              f"data.n_train={steps * batch}", "data.n_val=256", "data.n_test=256",
                              f"data.batch_size={batch}", "run.device=cpu", "optim.epochs=1000", *overrides])
    trainer = Trainer(cfg, Path(tmp), DistInfo())
    trainer.logger.start(0)
    return trainer


class MlmlEpochs:
    """Rounds of `Trainer.train_epoch` (one epoch each); returns images/s."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer
        self.total = trainer.cfg.optim.epochs * trainer.steps_per_epoch
        self.warmup = int(trainer.cfg.optim.warmup_epochs * trainer.steps_per_epoch)

    def __call__(self) -> float:
        t = self.t
        clock = Clock().start()
        t.train_epoch(self.total, self.warmup)
        rates = clock.rates(t.steps_per_epoch * t.batch_per_rank)
        t.epoch, t.step_in_epoch = t.epoch + 1, 0
        return rates


class BareLoop:
    """The hand-written loop on a copy of the trainer's model and the same batches, pre-collated."""

    def __init__(self, trainer: Trainer) -> None:
        self.model = copy.deepcopy(trainer.model)
        self.opt = build_optimizer(trainer.cfg, self.model, trainer.method)   # same groups, lr, decay
        self.loss = get_loss(trainer.cfg.method.loss)
        loader = trainer.train_loader
        loader.sampler.set_epoch(0)
        self.batches = [{k: v for k, v in b.items() if k in ("image", "targets", "observed")} for b in loader]

    def step(self, i: int) -> None:
        b = self.batches[i % len(self.batches)]
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model(b["image"])["logits"], b["targets"], b["observed"])
        loss.backward()
        self.opt.step()

    def __call__(self) -> dict[str, float]:
        self.model.train()
        clock = Clock().start()
        for i in range(len(self.batches)):
            self.step(i)
        return clock.rates(sum(len(b["image"]) for b in self.batches))


def paired_epoch(trainer: Trainer, mlml: MlmlEpochs, bare: BareLoop) -> dict[str, float]:
    """One mlml epoch with one bare step right after each mlml step; returns the ratios mlml / bare.

    Pairing the two step by step (rather than epoch by epoch) puts a burst of load from other
    processes on both sides of a ratio. The bare step runs inside the method's `after_optimizer_step` and
    its time is taken out of the epoch's.
    """
    bare.model.train()
    spent = {"wall": 0.0, "cpu": 0.0}
    hook = trainer.method.after_optimizer_step

    def after_optimizer_step(model, step):
        hook(model, step)
        w, c = time.perf_counter(), time.process_time()
        bare.step(step)
        spent["wall"] += time.perf_counter() - w
        spent["cpu"] += time.process_time() - c

    trainer.method.after_optimizer_step = after_optimizer_step   # an instance attribute shadows the method
    try:
        w, c = time.perf_counter(), time.process_time()
        mlml.t.train_epoch(mlml.total, mlml.warmup)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
    finally:
        del trainer.method.after_optimizer_step
    trainer.epoch, trainer.step_in_epoch = trainer.epoch + 1, 0
    n = trainer.steps_per_epoch * trainer.batch_per_rank
    return {"mlml": n / (wall - spent["wall"]), "bare": n / spent["wall"], "ratio": spent["wall"] / (wall - spent["wall"]),
            "ratio_cpu": spent["cpu"] / (cpu - spent["cpu"])}


def overhead(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp, args.steps, args.batch)
        mlml, bare = MlmlEpochs(trainer), BareLoop(trainer)
        mlml(); bare()                                           # warm-up (allocator, first epoch)
        rounds = [paired_epoch(trainer, mlml, bare) for _ in range(args.rounds)]
        trainer.logger.close()
    return {"mlml_images_per_s": summary([r["mlml"] for r in rounds]), "bare_images_per_s": summary([r["bare"] for r in rounds]),
            "ratio": summary([r["ratio"] for r in rounds]), "ratio_cpu": summary([r["ratio_cpu"] for r in rounds]),
            "steps_per_round": args.steps, "batch": args.batch, "threads": torch.get_num_threads()}


def method_overrides(name: str) -> list[str]:
    """Config that runs method `name` with the quick profile (its `requires`)."""
    base = [f"method.name={name}", *METHODS.get(name).requires]
    return base


def method_costs(args: argparse.Namespace) -> dict:
    """Images/s of each registered method relative to supervised (same model, data, steps); the domain
    branch relative to supervised on the same per-group data (it needs several domains)."""
    out = {}
    per_group = ["data.observation=per_group"]
    cases = [(n, method_overrides(n), []) for n in METHODS.names() if n != "supervised"]
    cases.append(("supervised+teacher", ["method.loss=asl", "method.teacher={weight = 1.0}"], []))
    cases.append(("grouped+teacher", [*method_overrides("grouped"), "method.teacher={weight = 1.0}"], []))
    cases.append(("supervised+domain_branch", [*per_group, "method.domain_branch={weight = 0.3}"], per_group))
    with tempfile.TemporaryDirectory() as tmp:
        refs: dict[tuple, MlmlEpochs] = {}
        for name, over, ref_over in cases:
            if tuple(ref_over) not in refs:
                refs[tuple(ref_over)] = MlmlEpochs(make_trainer(f"{tmp}/supervised{len(refs)}", args.method_steps, args.batch, ref_over))
                refs[tuple(ref_over)]()
            ref = refs[tuple(ref_over)]
            other = MlmlEpochs(make_trainer(f"{tmp}/{name}", args.method_steps, args.batch, over))
            other()
            r = ab_rounds(other, ref, args.method_rounds)
            out[name] = {"relative_rate": r["ratio"], "relative_rate_cpu": r["ratio_cpu"], "images_per_s": r["a"]}
            print(f"  {name:<26} {fmt_ratio(r['ratio'])} of supervised (CPU time: {fmt_ratio(r['ratio_cpu'])})", flush=True)
            other.t.logger.close()
        for ref in refs.values():
            ref.t.logger.close()
    return out


def precision(args: argparse.Namespace) -> dict:
    """Training images/s with `optim.amp = "on"` (bf16 autocast on the CPU) relative to fp32, same model
    and batches, at the quick profile's width 24 and the real profile's width 32."""
    out = {"cpu_bf16_units": cpu_bf16_units() or "none"}
    with tempfile.TemporaryDirectory() as tmp:
        for width in (24, 32):
            fp32 = MlmlEpochs(make_trainer(f"{tmp}/fp32_{width}", args.method_steps, args.batch, [f"model.width={width}"]))
            bf16 = MlmlEpochs(make_trainer(f"{tmp}/bf16_{width}", args.method_steps, args.batch, [f"model.width={width}", "optim.amp=on"]))
            fp32(); bf16()
            r = ab_rounds(bf16, fp32, args.method_rounds)
            out[f"width_{width}"] = {"relative_rate": r["ratio"], "relative_rate_cpu": r["ratio_cpu"], "images_per_s": r["a"],
                                     "fp32_images_per_s": r["b"]}
            print(f"  bf16 / fp32 at width {width}: {fmt_ratio(r['ratio'])} (CPU time: {fmt_ratio(r['ratio_cpu'])})", flush=True)
            fp32.t.logger.close(); bf16.t.logger.close()
    return out


def profile(args: argparse.Namespace) -> None:
    """Where the time goes: torch.profiler op table and cProfile of one mlml epoch and one bare epoch."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp, args.steps, args.batch)
        mlml, bare = MlmlEpochs(trainer), BareLoop(trainer)
        mlml(); bare()
        for name, fn in (("mlml", mlml), ("bare", bare)):
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                rate = fn()[""]
            print(f"\n=== {name}: {rate:.0f} images/s (under the profiler)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
            pr = cProfile.Profile()
            pr.enable()
            rate = fn()[""]
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(args.rows)
            print(f"=== {name}: {rate:.0f} images/s (under cProfile)\n{s.getvalue()}")
        trainer.logger.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="optimiser steps per round (one epoch)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--method-steps", type=int, default=6)
    p.add_argument("--method-rounds", type=int, default=3)
    p.add_argument("--no-methods", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--rows", type=int, default=25)
    return p


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    result = {"overhead": overhead(args)}
    o = result["overhead"]
    print(f"trainer overhead: mlml / bare = {fmt_ratio(o['ratio'])} (CPU time: {fmt_ratio(o['ratio_cpu'])})", flush=True)
    if not args.no_methods:
        result["methods"] = method_costs(args)
    result["precision"] = precision(args)
    return result


def main() -> None:
    args = parser().parse_args()
    if args.profile:
        torch.set_num_threads(args.threads)
        profile(args)
        return
    import json
    print(json.dumps(run(args), indent=2, default=float))


if __name__ == "__main__":
    main()
