"""Write the synthetic data as files: an image folder plus an annotation file.

    DIR/images/<shape>/<i>.png    ImageNet-style: the folder is the shape of the image's first object
    DIR/annotations.jsonl         every image's full labels as positives (or annotations.csv)
    DIR/labels.json               the label names in their groups (colour, object)

so the file sources (`folder`, `annotations`, `recolour`) can be exercised end to end on data
whose ground truth is known. Only positives are written: the annotation file says nothing about
negatives, as most real ones do.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mlml.config import DataConfig
from mlml.data.annotations import SEPARATOR
from mlml.data.synthetic import SyntheticSource

_CHUNK = 256


def export_synthetic(cfg: DataConfig, out: str | Path, n: int, fmt: str = "jsonl") -> dict[str, str]:
    """Render `n` images of the configured synthetic source (`[data.synthetic]`, `cfg.data_seed`) to files."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"annotation format must be jsonl or csv, got '{fmt}'")
    out = Path(out)
    source = SyntheticSource(cfg.settings("synthetic"), n, cfg.data_seed)
    space = source.label_space
    labels = {"groups": [{"name": g.name, "labels": [space.names[i] for i in g.labels], "exclusive": g.exclusive} for g in space.groups]}
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    annotations = out / f"annotations.{fmt}"
    with open(annotations, "w", newline="") as f:
        writer = csv.writer(f) if fmt == "csv" else None
        if writer:
            writer.writerow(["path", "positives"])
        for start in range(0, n, _CHUNK):
            rows = np.arange(start, min(n, start + _CHUNK))
            for i, image in zip(rows.tolist(), source.images(rows)):
                path = Path("images") / source.objects(i)[0].shape / f"{i:06d}.png"
                (out / path.parent).mkdir(exist_ok=True)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / path)
                positives = [space.names[c] for c in source.labels.row(i)]
                if writer:
                    writer.writerow([path.as_posix(), SEPARATOR.join(positives)])
                else:
                    f.write(json.dumps({"path": path.as_posix(), "positives": positives}) + "\n")
    return {"folder": str(out / "images"), "annotations": str(annotations), "label_names": str(out / "labels.json")}
