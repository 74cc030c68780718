"""Per label: what a teacher run's pseudo-labels would be on its unlabelled training images.

    python experiments/pseudo_labels_per_label.py runs/semi_study/five_percent/mean_teacher_em/seed0 [more run dirs...]

For each run (its checkpoints/best.pt: the teacher, for a teacher run) and up to `--images` (2,000)
of its unlabelled training images (weak view: the images as stored), the share of each label's
true positives the run's pseudo-labelling thresholds would keep and how precise they are, against
the hidden full labels: pseudo-positives at p >= pos_threshold, pseudo-negatives at p <= neg_threshold
(the run's `method.teacher` values). TensorBoard's `train/pseudo_*` give the same counts over all
labels during training; this script splits them by label, at the chosen checkpoint.
"""

from __future__ import annotations

import argparse

import torch

from mlml.config import Config, from_dict
from mlml.data.pipeline import build_data
from mlml.inference import load_predictor
from mlml.methods.teacher import TeacherSettings
from mlml.settings import upgrade_stored_config


def per_label(run: str, images: int) -> str:
    predictor = load_predictor(f"{run}/checkpoints/best.pt")
    cfg = from_dict(Config, upgrade_stored_config(predictor.config))
    teacher = cfg.method.teacher or {}
    pos_t = float(teacher.get("pos_threshold", TeacherSettings.pos_threshold))
    neg_t = float(teacher.get("neg_threshold", TeacherSettings.neg_threshold))
    data = build_data(cfg.data, cache=("val",))
    train = data.splits["train"]
    rows = train[~data.observation.labelled(train)][:images]
    if len(rows) == 0:
        return f"{run}: no unlabelled training images\n"
    full = data.source.labels.dense(rows).bool()
    probs = torch.cat([predictor.probabilities(torch.stack([data.source.image(int(r)) for r in rows[i:i + 256]]))
                       for i in range(0, len(rows), 256)])
    pos, neg = probs >= pos_t, probs <= neg_t
    lines = [f"{run}: {len(rows)} unlabelled training images, pseudo-positive p >= {pos_t}, pseudo-negative p <= {neg_t}",
             "label       prevalence  pos/image  pos precision  pos recall  neg/image  neg precision"]
    for c, name in enumerate(data.label_space.names):
        true = full[:, c]
        kept, dropped = (pos[:, c] & true).sum().item(), (neg[:, c] & true).sum().item()
        n_pos, n_neg = pos[:, c].sum().item(), neg[:, c].sum().item()
        lines.append(f"{name:10s}  {true.float().mean().item():10.2f}  {n_pos / len(rows):9.3f}  "
                     f"{kept / max(n_pos, 1):13.2f}  {kept / max(true.sum().item(), 1):10.2f}  "
                     f"{n_neg / len(rows):9.2f}  {1 - dropped / max(n_neg, 1):13.2f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with checkpoints/best.pt)")
    parser.add_argument("--images", type=int, default=2000, help="unlabelled training images per run")
    args = parser.parse_args()
    for run in args.runs:
        print(per_label(run, args.images))


if __name__ == "__main__":
    main()
