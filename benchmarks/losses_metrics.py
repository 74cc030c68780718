"""Losses and metrics at scale: every loss against plain BCE, mAP against scikit-learn, ROLE's table.

    python benchmarks/losses_metrics.py                        # B = 256, C = 11,000; mAP on 50,000 x 11,000
    python benchmarks/losses_metrics.py --map-n 5000 --map-c 1000 --sk-classes 20   # smaller

**Losses:** forward + backward of every registered loss on logits (B, C) with single-positive
labels (one observed positive per row), relative to `F.binary_cross_entropy_with_logits` (mean) on
the same logits: each round runs the pair `--loss-iters` times, alternating which goes first, and the
figure is the per-round time ratio loss / BCE (median and range; target <= 1.5).

**mAP:** `mlml.metrics.mean_average_precision` on scores (N, C) with Zipf-frequent labels (~3
positives per image) against scikit-learn's per-class loop (`average_precision_score` on each
column, the usual way), run on `--sk-classes` classes spread over the frequency range and
extrapolated per class to all C (stated in the result); the APs of those classes must agree to 1e-6.
Peak memory is the growth of this process's peak RSS during the call (the inputs excluded).

**ROLE:** the per-sample label table of ROLE ((N, C) float32 logits, a parameter under AdamW) at
`--role-n` images: its memory and one step (gather of B rows, backward, optimiser update), and
both extrapolated linearly in N x C to 12M x 11K (stated).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import fmt_ratio, summary  # noqa: E402

from mlml.losses import LOSSES, get_loss  # noqa: E402
from mlml.metrics import average_precision, mean_average_precision  # noqa: E402


def single_positive_batch(b: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (B, C) ~ N(-3, 2), targets and observed with one observed positive per row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g) * 2 - 3
    observed = torch.zeros(b, c, dtype=torch.bool)
    observed[torch.arange(b), torch.randint(0, c, (b,), generator=g)] = True
    return logits, observed.float(), observed


def fwd_bwd(fn, logits: torch.Tensor, targets: torch.Tensor, observed: torch.Tensor) -> float:
    x = logits.detach().requires_grad_(True)
    start = time.perf_counter()
    fn(x, targets, observed).backward()
    return time.perf_counter() - start


def loss_ratios(args: argparse.Namespace) -> dict:
    logits, targets, observed = single_positive_batch(args.batch, args.classes)
    bce = lambda x, t, o: F.binary_cross_entropy_with_logits(x, t)   # noqa: E731
    out = {}
    for name in LOSSES.names():
        fn = get_loss(name)
        fwd_bwd(fn, logits, targets, observed); fwd_bwd(bce, logits, targets, observed)   # warm-up
        ratios, seconds = [], []
        for r in range(args.rounds):
            t_loss = t_bce = 0.0
            for i in range(args.loss_iters):
                if (r + i) % 2 == 0:
                    t_loss += fwd_bwd(fn, logits, targets, observed); t_bce += fwd_bwd(bce, logits, targets, observed)
                else:
                    t_bce += fwd_bwd(bce, logits, targets, observed); t_loss += fwd_bwd(fn, logits, targets, observed)
            ratios.append(t_loss / t_bce)
            seconds.append(t_loss / args.loss_iters)
        out[name] = {"ratio_to_bce": summary(ratios), "ms": 1000 * float(np.median(seconds))}
        print(f"  loss {name:<13} {fmt_ratio(out[name]['ratio_to_bce'])} x BCE  ({out[name]['ms']:.1f} ms)", flush=True)
    return out


def zipf_targets(n: int, c: int, seed: int = 0) -> torch.Tensor:
    """Bool (N, C): 1 + Poisson(2.15) labels per row, Zipf(1.1) label frequencies (as the label-store benchmark)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, c + 1) ** 1.1
    cdf = np.cumsum(weights / weights.sum())
    want = 1 + rng.poisson(2.15, n)
    labels = np.minimum(np.searchsorted(cdf, rng.random(int(want.sum()))), c - 1)
    rows = np.repeat(np.arange(n), want)
    t = torch.zeros(n, c, dtype=torch.bool)
    t[torch.from_numpy(rows), torch.from_numpy(labels)] = True
    return t


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def map_vs_sklearn(args: argparse.Namespace) -> dict:
    from sklearn.metrics import average_precision_score

    n, c = args.map_n, args.map_c
    targets = zipf_targets(n, c)
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(n, c, generator=g) + 0.5 * targets            # informative, with ties improbable
    scores[: n // 10, : c // 10] = scores[: n // 10, : c // 10].mul(20).round()   # and a block full of ties
    has_pos = targets.any(0)
    gc.collect()
    base = peak_rss_mb()
    start = time.perf_counter()
    ours = mean_average_precision(scores, targets, average=None)      # (C,)
    ours_s = time.perf_counter() - start
    ours_peak = peak_rss_mb() - base
    ours_map = float(ours[has_pos].mean())

    # scikit-learn's loop on a subsample of classes (with positives), spread over the frequency ranks.
    candidates = torch.nonzero(has_pos).flatten().numpy()
    pick = candidates[np.linspace(0, len(candidates) - 1, min(args.sk_classes, len(candidates))).astype(int)]
    s_np, t_np = scores.numpy(), targets.numpy()
    start = time.perf_counter()
    sk = np.array([average_precision_score(t_np[:, j], s_np[:, j]) for j in pick])
    sk_s_per_class = (time.perf_counter() - start) / len(pick)
    sk_full_s = sk_s_per_class * c
    diff = float(np.abs(sk - ours[pick].double().numpy()).max())
    # Ours on the same subsample (to compare per class at equal work as well).
    start = time.perf_counter()
    average_precision(scores[:, torch.from_numpy(pick)], targets[:, torch.from_numpy(pick)])
    ours_sub_s_per_class = (time.perf_counter() - start) / len(pick)
    result = {
        "n": n, "c": c, "classes_with_positives": int(has_pos.sum()), "positives_per_image": float(targets.sum() / n),
        "scores_gb": scores.numel() * 4 / 2**30, "mlml_s": ours_s, "mlml_peak_extra_rss_mb": ours_peak, "mAP_macro": ours_map,
        "sklearn_classes_timed": len(pick), "sklearn_s_per_class": sk_s_per_class,
        "sklearn_s_extrapolated_to_all_classes": sk_full_s, "speedup": sk_full_s / ours_s,
        "max_abs_ap_difference": diff, "equal_to_1e-6": diff <= 1e-6,
        "mlml_s_per_class_on_the_subsample": ours_sub_s_per_class,
    }
    print(f"  mAP {n} x {c}: mlml {ours_s:.1f} s (peak +{ours_peak:.0f} MB), scikit-learn {sk_s_per_class * 1000:.1f} ms/class "
          f"x {c} = {sk_full_s:.0f} s (extrapolated from {len(pick)} classes): {result['speedup']:.0f}x, max |diff| {diff:.1e}", flush=True)
    return result


def role_table(args: argparse.Namespace) -> dict:
    """ROLE's (N, C) table as the method keeps it (a parameter of logits under AdamW, no weight decay):
    memory, and one step's gather of B rows + backward (a dense gradient) + optimiser update."""
    n, c, b = args.role_n, args.classes, args.batch
    table = torch.nn.Parameter(torch.zeros(n, c))
    opt = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.0)
    times = []
    for r in range(args.rounds + 1):
        idx = torch.randint(0, n, (b,))
        start = time.perf_counter()
        rows = torch.sigmoid(table[idx])                         # (B, C): the gather ROLE does per step
        rows.sum().backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    per_entry = 16                                              # value, Adam's two moments, the dense gradient
    at_12m = 12_000_000 * c
    step_ms = summary([1000 * t for t in times[1:]])
    return {"n": n, "c": c, "entries": n * c, "memory_mb_with_adam": n * c * per_entry / 2**20, "step_ms": step_ms,
            "memory_tb_at_12M": at_12m * per_entry / 2**40,
            "step_s_at_12M_extrapolated": step_ms["median"] / 1000 * at_12m / (n * c),
            "note": "every step updates the whole table (Adam on a dense gradient): time and memory linear in N x C; "
                    "at 12M x 11K that is ~2 TB and hours per step on a CPU, so ROLE needs a sparse (touched rows only) table "
                    "to run there; the method refuses tables above method.args.max_table_entries (50M)"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=11_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loss-iters", type=int, default=4)
    p.add_argument("--map-n", type=int, default=50_000)
    p.add_argument("--map-c", type=int, default=11_000)
    p.add_argument("--sk-classes", type=int, default=40, help="classes timed with scikit-learn (extrapolated to all)")
    p.add_argument("--role-n", type=int, default=4_000, help="ROLE table rows (x --classes); 4,000 x 11,000 = 44M entries")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["losses", "map", "role"])
    return p


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    out: dict = {"threads": args.threads}
    if "losses" not in args.skip:
        out["losses"] = {"batch": args.batch, "classes": args.classes, "per_loss": loss_ratios(args)}
    if "map" not in args.skip:
        out["map"] = map_vs_sklearn(args)
    if "role" not in args.skip:
        out["role"] = role_table(args)
    return out


if __name__ == "__main__":
    import json
    print(json.dumps(run(parser().parse_args()), indent=2, default=float))
