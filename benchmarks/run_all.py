"""`make bench`: the CPU benchmark suite, written to `benchmarks/results/<machine>.json` and `.md`.

    python benchmarks/run_all.py                 # everything, ~6-9 minutes on 2 cores
    python benchmarks/run_all.py --quick         # fewer rounds and smaller sizes (~2-3 minutes)
    python benchmarks/run_all.py --only losses_metrics data

Every figure is a ratio against a baseline measured in the same run, alternating the two over
several rounds (median and range); the machine (CPU, cores, load average at start and end,
versions, commit) is recorded with them. Parts: trainer overhead and method costs
(`trainer_overhead.py`), losses / mAP / ROLE (`losses_metrics.py`), the label store at 1/10 of 12M
x 11K extrapolated linearly (`label_store.py`), loader rates against training (`data_rates.py`),
DDP scaling on CPU with gloo (`ddp_throughput.py`). The GPU part is `gpu_suite.py`, run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import data_rates  # noqa: E402
import losses_metrics  # noqa: E402
import trainer_overhead  # noqa: E402
from harness import fmt_ratio, machine, write_results  # noqa: E402

PARTS = ("trainer", "losses_metrics", "label_store", "data", "ddp")


def label_store(quick: bool) -> dict:
    """benchmarks/label_store.py at 1/10 (1/100 with --quick) of 12M x 11K, in a subprocess; linear extrapolation."""
    scale = 100 if quick else 10
    n = 12_000_000 // scale
    cmd = [sys.executable, str(HERE / "label_store.py"), "--n", str(n), "--row-path", "0", "--annotation-lines", "0",
           "--batches", "500", "--dir", f"/tmp/mlml-bench-store-{os.getpid()}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out[out.index("{"):])
    r["scale"] = f"1/{scale} of 12M rows; build time, disk and build memory extrapolated x{scale} (linear in rows)"
    r["extrapolated_12M"] = {"build_s": r["build_s"] * scale, "disk_gb": r["disk_mb"] * scale / 1024,
                             "store_gb": r["store_nbytes_mb"] * scale / 1024}
    return r


def ddp(quick: bool) -> dict:
    path = Path(f"/tmp/mlml-bench-ddp-{os.getpid()}.json")
    cmd = [sys.executable, str(HERE / "ddp_throughput.py"), "--steps", "6" if quick else "12", "--repeats", "1",
           "--threads", "1", "--json", str(path)]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    r = json.loads(path.read_text())
    path.unlink()
    return r


def run(args: argparse.Namespace) -> dict:
    q = args.quick
    res: dict = {"machine": machine(), "quick": q, "parts": {}, "seconds": {}}
    for part in args.only or PARTS:
        start = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "trainer":
            a = trainer_overhead.parser().parse_args(["--rounds", "5" if q else "9", "--steps", "8" if q else "12",
                                                      "--method-steps", "3" if q else "4", "--method-rounds", "3"])
            res["parts"][part] = trainer_overhead.run(a)
        elif part == "losses_metrics":
            a = losses_metrics.parser().parse_args(
                ["--rounds", "3" if q else "5"] + (["--map-n", "20000", "--map-c", "2000", "--sk-classes", "20"] if q else []))
            res["parts"][part] = losses_metrics.run(a)
        elif part == "label_store":
            res["parts"][part] = label_store(q)
        elif part == "data":
            a = data_rates.parser().parse_args(["--rounds", "3", "--photos", "512" if q else "1024"])
            res["parts"][part] = data_rates.run(a)
        elif part == "ddp":
            res["parts"][part] = ddp(q)
        res["seconds"][part] = round(time.perf_counter() - start, 1)
        torch.set_num_threads(os.cpu_count() or 1)
    res["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return res


def check(value: float, target: float, higher: bool = True) -> str:
    return "met" if (value >= target if higher else value <= target) else "**missed**"


def markdown(res: dict) -> str:
    m, p = res["machine"], res["parts"]
    out = [f"# Benchmarks — {m['name']}", "",
           f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; torch {m['torch']}, Python {m['python']}; commit {m['commit']}; "
           f"{m['date']}. Load average (1 min) {m['load_average_1min_at_start']} at start, {m.get('load_average_1min_at_end')} at end "
           f"(the machine is shared: a load above the core count means other processes ran). "
           f"Each figure: median (min-max) over alternating rounds against a baseline of the same run. "
           f"Seconds per part: {res['seconds']}.", ""]
    if "trainer" in p:
        o = p["trainer"]["overhead"]
        out += ["## Trainer overhead (1 thread, quick profile: small CNN, 32 px, batch 128)", "",
                "| figure | median (range) | target |", "|---|---|---|",
                f"| mlml train steps / bare loop, images/s (wall) | {fmt_ratio(o['ratio'])} | >= 0.95: {check(o['ratio']['median'], 0.95)} |",
                f"| the same by this process's CPU time | {fmt_ratio(o['ratio_cpu'])} | |",
                f"| mlml images/s; bare images/s | {o['mlml_images_per_s']['median']:.0f}; {o['bare_images_per_s']['median']:.0f} | |", ""]
        if "methods" in p["trainer"]:
            out += ["Each method's training images/s relative to `supervised` (same model and data; < 1 = slower):", "",
                    "| method | relative rate (wall) | by CPU time |", "|---|---|---|"]
            for name, r in p["trainer"]["methods"].items():
                out.append(f"| {name} | {fmt_ratio(r['relative_rate'])} | {fmt_ratio(r['relative_rate_cpu'])} |")
            out.append("")
        if "precision" in p["trainer"]:
            pr = p["trainer"]["precision"]
            out += [f"Training images/s with `optim.amp = \"on\"` (bf16 autocast on the CPU) relative to fp32, quick data and "
                    f"model at two widths (the CPU's bf16 units: {pr['cpu_bf16_units']}):", "",
                    "| width | bf16 / fp32 (wall) | by CPU time | images/s bf16; fp32 |", "|---|---|---|---|"]
            for key, r in pr.items():
                if key.startswith("width_"):
                    out.append(f"| {key[6:]} | {fmt_ratio(r['relative_rate'])} | {fmt_ratio(r['relative_rate_cpu'])} | "
                               f"{r['images_per_s']['median']:.0f}; {r['fp32_images_per_s']['median']:.0f} |")
            out.append("")
    if "losses_metrics" in p:
        lm = p["losses_metrics"]
        if "losses" in lm:
            L = lm["losses"]
            out += [f"## Losses: forward + backward at B = {L['batch']}, C = {L['classes']:,} ({lm['threads']} threads)", "",
                    "| loss | time / BCE-with-logits | ms | target <= 1.5 |", "|---|---|---|---|"]
            for name, r in L["per_loss"].items():
                out.append(f"| {name} | {fmt_ratio(r['ratio_to_bce'])} | {r['ms']:.1f} | {check(r['ratio_to_bce']['median'], 1.5, higher=False)} |")
            out.append("")
        if "map" in lm:
            r = lm["map"]
            out += [f"## mAP on {r['n']:,} x {r['c']:,} scores ({r['scores_gb']:.1f} GB float32)", "",
                    "| figure | value |", "|---|---|",
                    f"| mlml `mean_average_precision` | {r['mlml_s']:.1f} s, peak memory +{r['mlml_peak_extra_rss_mb']:.0f} MB |",
                    f"| scikit-learn per-class loop | {r['sklearn_s_per_class'] * 1000:.1f} ms/class on {r['sklearn_classes_timed']} classes, "
                    f"x {r['c']:,} = {r['sklearn_s_extrapolated_to_all_classes']:.0f} s (extrapolated) |",
                    f"| speed-up (target >= 50) | {r['speedup']:.1f}x: {check(r['speedup'], 50)} |",
                    f"| max abs AP difference on the timed classes (<= 1e-6) | {r['max_abs_ap_difference']:.1e}: "
                    f"{'met' if r['equal_to_1e-6'] else '**missed**'} |", ""]
        if "role" in lm:
            r = lm["role"]
            out += ["## ROLE's per-sample table", "",
                    f"{r['n']:,} x {r['c']:,} = {r['entries']:,} entries: {r['memory_mb_with_adam']:.0f} MB with AdamW, "
                    f"one step (gather, backward, update) {fmt_ratio(r['step_ms'], 0)} ms. Linear in N x C: at 12M x 11K "
                    f"{r['memory_tb_at_12M']:.1f} TB and ~{r['step_s_at_12M_extrapolated']:.0f} s per step. {r['note'][0].upper() + r['note'][1:]}.", ""]
    if "label_store" in p:
        r = p["label_store"]
        e = r["extrapolated_12M"]
        out += ["## Label store (`benchmarks/label_store.py`)", "",
                f"Measured at {r['n']:,} x {r['c']:,} ({r['scale']}): build {r['build_s']:.1f} s (extra RSS {r['build_extra_rss_mb']:.0f} MB), "
                f"disk {r['disk_mb']:.0f} MB, {r['positives_per_image']:.2f} positives/image, {r['row_lookups_per_s']:,.0f} row lookups/s, "
                f"batch densify (B = 256, positives + negatives) {r['batch_densify_ms_median']:.2f} ms median "
                f"({r['batch_densify_ms_p95']:.2f} p95). At 12M: build ~{e['build_s']:.0f} s, ~{e['disk_gb']:.2f} GB on disk and in "
                f"the page cache (memory-mapped); lookups and densify do not depend on N.", ""]
    if "data" in p:
        d = p["data"]
        out += [f"## Data: loader images/s against training consumption ({d['image_size']} px, batch {d['batch']}, "
                f"training with {d['training_threads']} thread)", "",
                f"Synthetic rendering: {d['synthetic_render_images_per_s']:,.0f} images/s (one core; cached once per run).", "",
                "| source | workers | loader images/s | training images/s | loader / training (target >= 2) |", "|---|---|---|---|---|"]
        for src in ("folder", "synthetic"):
            for w, r in d[src].items():
                out.append(f"| {src} | {w.split('_')[1]} | {r['loader_images_per_s']['median']:,.0f} | "
                           f"{r['training_images_per_s']['median']:,.0f} | {fmt_ratio(r['ratio_to_training'])}: "
                           f"{check(r['ratio_to_training']['median'], 2)} |")
        out.append("")
    if "ddp" in p:
        out += ["## DDP scaling (CPU, gloo, 1 thread per process: a smoke test of the code path, not of GPUs)", "",
                "| global batch | processes | train images/s | speed-up | efficiency |", "|---|---|---|---|---|"]
        for dev, r in p["ddp"].items():
            for mode in ("fixed", "scaled"):
                for n, rec in r.get(mode, {}).items():
                    if "efficiency" in rec:
                        out.append(f"| {mode} ({rec['global_batch']}) | {n} | {rec['train_images_per_s']:.0f} | "
                                   f"{rec['speedup']:.2f} | {rec['efficiency']:.2f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", choices=PARTS)
    p.add_argument("--name", default=None, help="results file name (default: the machine's, e.g. cpu-2c)")
    args = p.parse_args()
    start = time.perf_counter()
    res = run(args)
    res["total_seconds"] = round(time.perf_counter() - start, 1)
    md = markdown(res) + f"\nTotal: {res['total_seconds'] / 60:.1f} min (`make bench`).\n"
    js, mdp = write_results(res, md, args.name)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
