"""Per label group: how much a table row gains over another, paired by seed (test AP per class).

    python experiments/gain_by_group.py runs/semi_study five_percent_balanced mean_teacher_em supervised_role

A table's add-on comparison gives one number per setting (macro mAP, paired by seed). A macro mean
can hide two groups that move apart: on the synthetic data the EMA teacher's gain falls on the
shapes and rises on the colours as labels shrink (README, "Semi-supervised study"). For each seed
present under both rows (`<runs>/<setting>/<row>/seed<k>/metrics.json`), this reads the test AP of
each class (`per_class_ap`: the teacher's for a teacher run, the model's otherwise) and averages
it over the labels of each group of the label space (from the row's `checkpoints/best.pt`); it
prints, per group and over all labels, the mean over seeds of (row minus baseline) and the sample
standard deviation of those paired differences.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mlml.inference import load_predictor


def per_class_ap(run: Path) -> dict[str, float]:
    stored = json.loads((run / "metrics.json").read_text())["per_class_ap"]
    return stored.get("teacher", stored.get("student", stored))


def group_gains(runs: Path, setting: str, row: str, baseline: str) -> dict[str, list[float]]:
    """{group name (and "all"): [row - baseline mean test AP over the group's labels, per seed]}."""
    done = lambda name: {p.name for p in (runs / setting / name).glob("seed*") if (p / "metrics.json").exists()}
    seeds = sorted(done(row) & done(baseline))
    if not seeds:
        raise SystemExit(f"no seed of {setting} has metrics.json under both {row} and {baseline} in {runs}")
    space = load_predictor(runs / setting / row / seeds[0] / "checkpoints" / "best.pt").label_space
    groups = {g.name: [space.names[i] for i in g.labels] for g in space.groups} | {"all": list(space.names)}
    gains: dict[str, list[float]] = {name: [] for name in groups}
    for seed in seeds:
        a, b = per_class_ap(runs / setting / row / seed), per_class_ap(runs / setting / baseline / seed)
        for name, labels in groups.items():
            gains[name].append(sum(a[n] - b[n] for n in labels) / len(labels))
    return gains


def report(runs: Path, setting: str, row: str, baseline: str) -> str:
    gains = group_gains(runs, setting, row, baseline)
    lines = [f"{setting}: {row} - {baseline}, test AP averaged over each group's labels, paired by seed"]
    for name, values in gains.items():
        spread = f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        lines.append(f"  {name:10s} {statistics.fmean(values):+.4f}{spread}  ({len(values)} seeds)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="a table's runs directory (runs/<table>)")
    parser.add_argument("setting")
    parser.add_argument("row", help="the row with the add-on (e.g. mean_teacher_em)")
    parser.add_argument("baseline", help="the row to compare with (e.g. the best row without the add-on)")
    args = parser.parse_args()
    print(report(args.runs, args.setting, args.row, args.baseline))


if __name__ == "__main__":
    main()
