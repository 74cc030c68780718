"""COCO instances JSON (`instances_train2017.json`, ...): image-level labels from the annotations.

An image's positives are the categories of its object annotations (crowd ones included); an image
without annotations has none. Labels are complete (no negatives listed): every category not
annotated counts negative in evaluation. Label names are the category names in id order (or
`data.coco.label_names`, naming the same categories). `data.coco.file` is one file (split at random)
or COCO's own split files, e.g. `{train = "annotations/instances_train2014.json", test =
"annotations/instances_val2014.json"}` as multi-label papers do. Image paths are `file_name`,
under `<root>/<name>/` when that folder exists for `instances_<name>.json` (COCO's layout), else
under `<root>` (default root: the annotation file's folder's parent when it is `annotations/`).

The JSON document is read element by element (`iter_top_level`), never parsed whole: a 450 MB
file with segmentation polygons is held as (image id, category id) pairs only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mlml.data.annotations import AnnotationError, AnnotationSettings, Entry, IndexedSource, read_label_names, write_index
from mlml.labels import LabelSpace

_CHUNK = 1 << 20



@dataclass(kw_only=True)
class CocoSettings(AnnotationSettings):
    """`[data.coco]`: instances JSON file(s), optional label names, the image root."""

    label_names: str = ""         # "" = the categories of the annotation file, in id order


class _Reader:
    """A JSON text read in chunks: whitespace skipping, single characters and whole values, with line numbers."""

    def __init__(self, f, path: Path) -> None:
        self.f, self.path = f, path
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.counted = 1, 0          # lines before buf[counted]
        self.decoder = json.JSONDecoder()

    def fill(self) -> bool:
        chunk = self.f.read(_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.line_no()
        self.buf, self.pos, self.counted = self.buf[self.pos :] + chunk, 0, 0
        return True

    def line_no(self) -> int:
        self.line += self.buf.count("\n", self.counted, self.pos)
        self.counted = self.pos
        return self.line

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos : self.pos + 1]

    def take(self, allowed: str) -> str:
        c = self.peek()
        if not c or c not in allowed:
            raise AnnotationError(self.path, self.line_no(), f"bad JSON: expected one of {allowed!r}, got {c or 'the end'!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if self.fill():
                    continue
                raise AnnotationError(self.path, self.line_no(), f"bad JSON: {err.msg}") from None
            if end == len(self.buf) and not self.eof and self.fill():   # a number may go on in the next chunk
                continue
            self.pos = end
            return value


def iter_top_level(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(key, line, item) for each element of each top-level array of a JSON object (other values: the value)."""
    with open(path, encoding="utf-8") as f:
        r = _Reader(f, path)
        r.take("{")
        if r.peek() == "}":
            return
        while True:
            key = r.value()
            r.take(":")
            if r.peek() == "[":
                r.take("[")
                if r.peek() == "]":
                    r.take("]")
                else:
                    while True:
                        line = r.line_no()
                        yield key, line, r.value()
                        if r.take(",]") == "]":
                            break
            else:
                yield key, r.line_no(), r.value()
            if r.take(",}") == "}":
                return


class _CocoFile:
    """What one instances file holds: images (id, file_name), categories, and (image id, category id) pairs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.images: list[tuple[int, str, int]] = []           # (id, file_name, line)
        self.categories: dict[int, str] = {}
        pairs: list[tuple[int, int, int]] = []                  # (image id, category id, line)
        for key, line, item in iter_top_level(path):
            if key not in ("images", "annotations", "categories"):
                continue
            try:
                if key == "images":
                    self.images.append((int(item["id"]), str(item["file_name"]), line))
                elif key == "annotations":
                    pairs.append((int(item["image_id"]), int(item["category_id"]), line))
                else:
                    self.categories[int(item["id"])] = str(item["name"])
            except (KeyError, TypeError, ValueError) as err:
                raise AnnotationError(path, line, f"bad {key} element: {err!r}") from None
        if not self.categories:
            raise AnnotationError(path, 1, "no categories")
        self.pairs = np.array([(i, c) for i, c, _ in pairs], dtype=np.int64).reshape(-1, 2)
        self.pair_lines = np.array([line for *_, line in pairs], dtype=np.int64)

    def label_space(self) -> LabelSpace:
        return LabelSpace(tuple(self.categories[c] for c in sorted(self.categories)))


def read_coco(files: dict[str, Path], root: Path, label_space: LabelSpace | None = None) -> tuple[LabelSpace, Iterator[Entry]]:
    """The label space and the entries of COCO instances files ({split: file}; split "" for one file)."""
    parsed = {split: _CocoFile(path) for split, path in files.items()}
    first = next(iter(parsed.values()))
    space = label_space or first.label_space()
    index = {name: k for k, name in enumerate(space.names)}
    for p in parsed.values():
        unknown = sorted(set(p.categories.values()) - set(index))
        if unknown:
            raise AnnotationError(p.path, 1, f"categories {unknown[:5]} are not in the label names")

    def entries() -> Iterator[Entry]:
        for split, p in parsed.items():
            name = p.path.stem.removeprefix("instances_")
            folder = f"{name}/" if (root / name).is_dir() else ""
            label_of = {cid: index[n] for cid, n in p.categories.items()}
            rows = {image_id: k for k, (image_id, _, _) in enumerate(p.images)}
            positives: list[set[int]] = [set() for _ in p.images]
            for (image_id, cid), line in zip(p.pairs.tolist(), p.pair_lines.tolist()):
                if image_id not in rows:
                    raise AnnotationError(p.path, line, f"annotation of image id {image_id}, which is not in images")
                if cid not in label_of:
                    raise AnnotationError(p.path, line, f"annotation of category id {cid}, which is not in categories")
                positives[rows[image_id]].add(label_of[cid])
            for (_, file_name, line), pos in zip(p.images, positives):
                yield Entry(folder + file_name, sorted(pos), [], split, p.path, line)

    return space, entries()


def coco_root(files: dict[str, Path]) -> Path:
    """Default image root: the parent of an `annotations/` folder holding the files, else their folder."""
    folder = next(iter(files.values())).parent
    return folder.parent if folder.name == "annotations" else folder


class CocoSource(IndexedSource):
    """Images of COCO instances files with their annotated categories as positives (see module doc)."""

    def __init__(self, files: dict[str, Path], root: Path | None, image_size: int, label_names: Path | None = None,
                 store: str | Path | None = None, allow_outside_root: bool = False) -> None:
        root = root or coco_root(files)

        def read(out: Path) -> dict:
            space, entries = read_coco(files, root, read_label_names(label_names) if label_names else None)
            return write_index(entries, space, root, out, "coco", next(iter(files.values())), allow_outside_root)

        inputs = [*files.values(), *([label_names] if label_names else [])]
        super().__init__("coco", inputs, root, image_size, read, store, [sorted(files)], allow_outside_root)
