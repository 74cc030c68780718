"""Open Images image-level labels: `ImageID,Source,LabelName,Confidence` CSV, one row per verified label.

Confidence 1 is a verified positive, 0 a verified negative; every label not listed for an image is
unknown. Known negatives make evaluation use the verified entries only (`data.eval_labels =
"auto"` -> annotated), as the Open Images protocol does. Rows of one image must be consecutive
(the published files are sorted by ImageID); a label listed twice with the same confidence (two
verification sources) counts once, with both confidences it is an error. Images are
`<root>/<ImageID>.jpg` (the official downloader's flat layout).

`data.openimages.file`: one file, or the published split files `{train =
"oidv6-train-annotations-human-imagelabels.csv", val = "validation-annotations-human-imagelabels.csv",
test = "test-annotations-human-imagelabels.csv"}`. `data.openimages.label_names`: the class descriptions CSV
(`LabelName,DisplayName`, with or without header; label names are the display names, a repeated
display name followed by its MID), or a `.txt`/`.json` of MIDs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mlml.data.annotations import AnnotationError, AnnotationSettings, Entry, IndexedSource, check_labels, read_label_names, write_index
from mlml.labels import LabelSpace

HEADER = ["ImageID", "Source", "LabelName", "Confidence"]


def read_class_descriptions(path: Path) -> tuple[LabelSpace, dict[str, int]]:
    """The label space and MID -> label index of a class descriptions CSV (or a label names file of MIDs)."""
    if path.suffix != ".csv":
        space = read_label_names(path)
        return space, {name: k for k, name in enumerate(space.names)}
    mids: dict[str, int] = {}
    names: list[str] = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        for cells in reader:
            if not cells or cells == ["LabelName", "DisplayName"]:
                continue
            if len(cells) != 2:
                raise AnnotationError(path, reader.line_num, f"{len(cells)} fields, expected LabelName,DisplayName")
            mid, name = (c.strip() for c in cells)
            if mid in mids:
                raise AnnotationError(path, reader.line_num, f"label '{mid}' is named twice")
            mids[mid] = len(names)
            names.append(name)
    repeated = {n for n in names if names.count(n) > 1} if len(set(names)) < len(names) else set()
    by_index = {k: mid for mid, k in mids.items()}
    names = [f"{n} ({by_index[k]})" if n in repeated else n for k, n in enumerate(names)]
    if not names:
        raise AnnotationError(path, 1, "no label names")
    return LabelSpace(tuple(names)), mids


def read_openimages(path: Path, mids: dict[str, int], label_space: LabelSpace, split: str = "") -> Iterator[Entry]:
    """The entries of one image-level labels file, an image per run of rows with its ImageID."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header[:1] != ["ImageID"] or not {"LabelName", "Confidence"} <= set(header):
            raise AnnotationError(path, 1, f"the header must be {','.join(HEADER)}; got {','.join(header) or 'nothing'}")
        col = {name: header.index(name) for name in ("ImageID", "LabelName", "Confidence")}
        image, start, labels = "", 0, {}                        # the current image: its first line, label -> confidence
        done_before = ""
        for cells in reader:
            if not cells:
                continue
            line = reader.line_num
            if len(cells) != len(header):
                raise AnnotationError(path, line, f"{len(cells)} fields, the header has {len(header)}")
            image_id, mid, conf = (cells[col[k]].strip() for k in ("ImageID", "LabelName", "Confidence"))
            if image_id != image:
                if image:
                    yield _entry(path, start, image, labels, label_space, split)
                if image_id == done_before or not image_id:
                    raise AnnotationError(path, line, f"image '{image_id}' again after other images; rows must be grouped by ImageID")
                done_before, image, start, labels = image, image_id, line, {}
            if mid not in mids:
                raise AnnotationError(path, line, f"unknown label '{mid}'; it is not in the label names file")
            if conf not in ("0", "1", "0.0", "1.0"):
                raise AnnotationError(path, line, f"confidence '{conf}' is neither 1 (verified positive) nor 0 (verified negative)")
            value = float(conf) == 1.0
            if labels.get(mids[mid], value) != value:
                raise AnnotationError(path, line, f"label '{mid}' is both positive and negative")
            labels[mids[mid]] = value
        if image:
            yield _entry(path, start, image, labels, label_space, split)


def _entry(path: Path, line: int, image: str, labels: dict[int, bool], label_space: LabelSpace, split: str) -> Entry:
    pos, neg = sorted(k for k, v in labels.items() if v), sorted(k for k, v in labels.items() if not v)
    check_labels(path, line, pos, neg, label_space)
    return Entry(f"{image}.jpg", pos, neg, split, path, line)



@dataclass(kw_only=True)
class OpenImagesSettings(AnnotationSettings):
    """`[data.openimages]`: label CSV file(s), the class descriptions, the image folder."""


class OpenImagesSource(IndexedSource):
    """Images of Open Images image-level label files with their verified labels (see module doc)."""

    def __init__(self, files: dict[str, Path], label_names: Path, root: Path | None, image_size: int,
                 store: str | Path | None = None, allow_outside_root: bool = False) -> None:
        root = root or next(iter(files.values())).parent
        space, mids = read_class_descriptions(label_names)
        entries = lambda: (e for split, f in files.items() for e in read_openimages(f, mids, space, split))   # noqa: E731
        read = lambda out: write_index(entries(), space, root, out, "openimages", next(iter(files.values())), allow_outside_root)  # noqa: E731
        super().__init__("openimages", [*files.values(), label_names], root, image_size, read, store, [sorted(files)], allow_outside_root)
