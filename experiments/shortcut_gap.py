"""How much a trained run relies on the collection shortcut (data.synthetic.nuisance = "collection").

    python experiments/shortcut_gap.py runs/domain_adversarial/shortcut/an/seed0 [more run dirs...]

For each run (its checkpoints/best.pt), on the test split, where background styles are drawn at
random: the mean logit of a label's *positive* images with style 0 minus that with style 1,
averaged over the labels of each group. Style k is the background of collection k in training
(per_group: 0 = colour, 1 = object), so a model that learned "colour-collection background ->
object labels negative" shows a large negative object gap and a large positive colour gap; a
model without the shortcut shows gaps near 0 (positives are compared with positives, so the gap
does not depend on how often a label occurs with either style). Runs of plain per_group data are
measured on the styled test images all the same.

It also prints each group's macro AP on the test images of each style (`AP colour s0/s1`): a group
whose labels were observed on one collection's images only (per_group) and whose AP falls on the
other style's test images did not transfer across the styles, whether or not the logits show a gap.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mlml.config import Config, from_dict
from mlml.data.pipeline import build_data
from mlml.data.synthetic import nuisance_styles
from mlml.inference import load_predictor
from mlml.metrics import mean_average_precision
from mlml.settings import upgrade_stored_config


@torch.no_grad()
def style_gaps(run: Path, chunk: int = 500) -> dict[str, float]:
    """{group name: mean over its labels of (mean positive logit, style 0) - (style 1)}."""
    predictor = load_predictor(run / "checkpoints" / "best.pt")
    model = predictor.model
    cfg = from_dict(Config, upgrade_stored_config(predictor.config))   # a checkpoint of an older mlml too
    cfg.data.settings("synthetic").nuisance = "collection"
    data = build_data(cfg.data)
    train, test = data.splits["train"], data.splits["test"]
    d = data.observation.num_domains
    styles = torch.from_numpy(nuisance_styles(len(data.source), train, data.observation.domain(train), d, cfg.data.data_seed)[test])
    logits = torch.cat([model(torch.stack([data.image(int(r)) for r in test[i : i + chunk]]))["logits"]
                        for i in range(0, len(test), chunk)])                     # (N, C)
    full = data.labels.dense(test)                                                  # bool (N, C)
    out = {}
    for group in data.label_space.groups:
        gaps = [float(logits[full[:, c] & (styles == 0), c].mean() - logits[full[:, c] & (styles == 1), c].mean())
                for c in group.labels if (full[:, c] & (styles == 0)).any() and (full[:, c] & (styles == 1)).any()]
        out[group.name] = float(np.mean(gaps))
        cols = torch.tensor(group.labels)
        for s in range(d):
            rows = styles == s
            out[f"AP {group.name} s{s}"] = float(mean_average_precision(logits[rows][:, cols], full[rows][:, cols]))
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        gaps = style_gaps(Path(arg))
        print(arg, "  ".join(f"{g}: {v:.3f}" if g.startswith("AP") else f"{g}: {v:+.2f}" for g, v in gaps.items()))
