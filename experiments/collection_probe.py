"""A fresh logistic-regression probe: how well a run's final features tell the collection of training images.

    python experiments/collection_probe.py runs/domain_adversarial/shortcut/asl_branch/seed0 [more run dirs...]

Fits on the backbone features of 1,000 training images (checkpoints/best.pt; the images as training saw
them, with their collection's style) and scores 1,000 others; chance is the larger collection's share.
A domain head at chance during training does not show that the collection is gone from the features
(the backbone may keep it in a form the head, chasing it batch by batch, cannot read): this probe does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from mlml.config import Config, from_dict
from mlml.data.pipeline import build_data
from mlml.inference import load_predictor
from mlml.settings import upgrade_stored_config


@torch.no_grad()
def probe_accuracy(run: Path, n: int = 1000, chunk: int = 250) -> tuple[float, float]:
    """(held-out accuracy of the probe, chance) on 2 n training images of the run's data."""
    predictor = load_predictor(run / "checkpoints" / "best.pt")
    model = predictor.model.eval()
    data = build_data(from_dict(Config, upgrade_stored_config(predictor.config)).data)
    rows = data.splits["train"][: 2 * n]
    domain = data.observation.domain(rows)
    features = torch.cat([model(torch.stack([data.image(int(r)) for r in rows[i : i + chunk]]))["features"]
                          for i in range(0, len(rows), chunk)]).float().numpy()
    fit, held = slice(0, n), slice(n, 2 * n)
    probe = LogisticRegression(max_iter=2000).fit(features[fit], domain[fit])
    chance = float(np.bincount(domain[held]).max() / len(domain[held]))
    return float(probe.score(features[held], domain[held])), chance


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        accuracy, chance = probe_accuracy(Path(arg))
        print(f"{arg}  probe accuracy {accuracy:.3f}  chance {chance:.3f}")
