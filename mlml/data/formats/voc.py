"""Pascal VOC: `ImageSets/Main/<set>.txt` lists image ids, `Annotations/<id>.xml` their objects.

An image's positives are the classes of its objects that are not `difficult`; a class present only
as difficult objects is unknown (neither positive nor negative), as the VOC evaluation ignores
difficult objects; every other class is a known negative. Known negatives make evaluation use the
annotated entries only (`data.eval_labels = "auto"` -> annotated), so a difficult-only class is
neither rewarded nor punished. Images are `JPEGImages/<id>.jpg`.

`data.voc.root` is the year's folder (`VOCdevkit/VOC2007`). Splits are image sets:
`data.voc.image_sets = {train = "trainval", test = "test"}` (VOC2007 as papers use it; VOC2012, whose
test labels are not public: `{train = "train", test = "val"}`); by default the sets `train`, `val`
and `test` that exist. Label names: the 20 VOC classes, or `data.voc.label_names`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mlml.data.annotations import AnnotationError, Entry, IndexedSource, check_labels, read_label_names, write_index
from mlml.data.image_files import SPLITS, FileSourceSettings
from mlml.labels import LabelSpace

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
           "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def image_sets(root: Path, sets: dict[str, str] | None) -> dict[str, Path]:
    """{split: ImageSets/Main/<set>.txt}: the given sets, or those of train/val/test that exist."""
    folder = root / "ImageSets" / "Main"
    if sets is None:
        sets = {s: s for s in SPLITS if (folder / f"{s}.txt").is_file()}
    files = {split: folder / f"{name}.txt" for split, name in sets.items()}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing or not files:
        raise AnnotationError(missing[0] if missing else folder, 1, "no such VOC image set")
    return files


def read_objects(xml: Path, index: dict[str, int]) -> tuple[list[int], list[int]]:
    """(positive, difficult-only) class indices of one annotation file."""
    try:
        text = xml.read_text()
        tree = ET.fromstring(text)
    except FileNotFoundError:
        raise AnnotationError(xml, 1, "no such annotation file") from None
    except ET.ParseError as err:
        raise AnnotationError(xml, err.position[0], f"bad XML: {err}") from None
    easy, difficult = set(), set()
    for obj in tree.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            line = text.count("\n", 0, max(0, text.find(f"<name>{name}"))) + 1
            raise AnnotationError(xml, line, f"unknown class '{name}'")
        (difficult if (obj.findtext("difficult") or "0").strip() == "1" else easy).add(index[name])
    return sorted(easy), sorted(difficult - easy)


def read_voc(root: Path, sets: dict[str, Path], label_space: LabelSpace) -> Iterator[Entry]:
    """The entries of the image sets ({split: list file}); negatives: every class neither positive nor difficult-only."""
    index = {name: k for k, name in enumerate(label_space.names)}
    for split, listing in sets.items():
        with open(listing) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                image_id = line.split()[0]
                xml = root / "Annotations" / f"{image_id}.xml"
                pos, ignored = read_objects(xml, index)
                neg = sorted(set(range(len(index))) - set(pos) - set(ignored))
                check_labels(xml, 1, pos, neg, label_space)
                yield Entry(f"JPEGImages/{image_id}.jpg", pos, neg, split, listing, line_no)



@dataclass(kw_only=True)
class VocSettings(FileSourceSettings):
    """`[data.voc]`: the year's folder and which image sets are the splits."""

    root: str                     # the year's folder, e.g. VOCdevkit/VOC2007
    image_sets: dict[str, str] = field(default_factory=dict)   # split -> image set, e.g. {train = "trainval", test = "test"}; {} = train, val, test
    label_names: str = ""         # "" = the 20 VOC classes
    allow_outside_root: bool = False


class VocSource(IndexedSource):
    """Images of VOC image sets with their non-difficult classes positive (see module doc)."""

    def __init__(self, root: Path, image_size: int, sets: dict[str, str] | None = None, label_names: Path | None = None,
                 store: str | Path | None = None, allow_outside_root: bool = False) -> None:
        files = image_sets(root, sets)
        space = read_label_names(label_names) if label_names else LabelSpace(CLASSES)
        read = lambda out: write_index(read_voc(root, files, space), space, root, out, "voc", root, allow_outside_root)   # noqa: E731
        inputs = [*files.values(), *([label_names] if label_names else [])]
        # An edited XML file is not seen (thousands of stats); one added or removed changes the folder's mtime.
        annotations_mtime = (root / "Annotations").stat().st_mtime_ns if (root / "Annotations").is_dir() else 0
        super().__init__("voc", inputs, root, image_size, read, store, [sorted(files), annotations_mtime], allow_outside_root)
