"""Annotation files: image paths with positive and (optionally) known negative labels by name.

Label names file (`data.annotations.label_names`):
  * `.txt`: one label name per line (blank lines and `#` comments skipped); one group `labels`.
  * `.json`: a list of names, or `{"groups": [{"name": "colour", "labels": ["red", ...],
    "exclusive": true}, ...]}` (every label in exactly one group; label order = listed order).

Annotation file (`data.annotations.file`), one image per line, paths relative to `data.annotations.root` (default:
the annotation file's folder), each image once; a path that leads outside the root (`../x.png`, an
absolute path elsewhere) is refused unless `data.annotations.allow_outside_root = true` (see
`resolve_image_path`; readers of other formats call it and `DuplicateCheck` too):
  * `.csv`: a header naming the columns `path`, `positives` and optionally `negatives` and
    `split`; a label cell lists names separated by `;` (empty: none).

        path,positives,negatives,split
        images/0001.jpg,cat;sofa,dog,train
        images/0002.jpg,dog,,test

  * `.jsonl`: one object per line, `{"path": "images/0001.jpg", "positives": ["cat", "sofa"],
    "negatives": ["dog"], "split": "train"}` (`negatives` and `split` optional; no other keys).

Fixed splits: a `split` column/key (train, val or test; on every line or on none), or one file
per split, `data.annotations.file = {train = "train.csv", val = "val.csv", test = "test.csv"}` (paths
relative to `root`, default the first file's folder; an image in two files is refused). A
source with splits is split as it says (see `mlml.data.pipeline`); one without, at random.

What is listed is what is known: listed positives are positive, listed negatives negative, every
other label unknown (the `annotated` observation model). Evaluation on such a source uses the
stored positives as full labels and counts every unlisted label negative, unless negatives are
listed (`data.eval_labels`). A line that cannot be used (bad syntax, not UTF-8, missing path, a
path outside the root, an image listed twice, unknown label name, a label listed twice or both
positive and negative, a bad split) stops with a one-line `AnnotationError` naming file, line and
reason, before any training.
Image files are not opened while indexing (millions of stats are slow on network storage); a
missing or corrupt image is found when loaded, and skipped and counted then.

The standard formats (`mlml.data.formats`: COCO, Pascal VOC, Open Images, Tencent ML-Images) are
readers that yield the same `Entry` rows into the same index (`write_index`, which checks every
reader's paths with `resolve_image_path` and `DuplicateCheck`).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from mlml.data.image_files import SPLITS, FileSource, FileSourceSettings, StringColumnWriter, cached_index, default_store_dir, file_signature
from mlml.data.label_store import LabelStoreBuilder, finish_npy
from mlml.labels import Group, LabelSpace
from mlml.settings import must

SEPARATOR = ";"
COLUMNS = ("path", "positives", "negatives", "split")


@dataclass(kw_only=True)
class AnnotationSettings(FileSourceSettings):
    """`[data.annotations]` (and the formats' tables): annotation files, label names, where the images are."""

    file: str | dict[str, str]    # the .csv / .jsonl annotation file, or one per split {train = "...", val = "...", test = "..."}
    label_names: str              # the .txt or .json label names file
    root: str = ""                # what image paths are relative to ("" = the (first) annotation file's folder)
    allow_outside_root: bool = False   # accept image paths that lead outside root (../x.png, /abs)

    def __post_init__(self) -> None:
        super().__post_init__()
        must(bool(self.file), "file", "an annotation file, or one per split", self.file)


class Entry(NamedTuple):
    """One image of an annotation source, as every reader yields it."""

    path: str               # relative to the source's root
    positives: list[int]    # label indices
    negatives: list[int]    # known negative label indices
    split: str              # one of SPLITS, or "" (the source gives no split)
    file: Path              # where it was read, for messages
    line: int


class AnnotationError(ValueError):
    """A line of an annotation or label names file cannot be used."""

    def __init__(self, file: Path | str, line: int | None, reason: str) -> None:
        where = f"{file}:{line}" if line is not None else f"{file}"
        super().__init__(f"{where}: {reason}".replace("\r", "\\r").replace("\n", "\\n"))


def resolve_image_path(root: Path, image: str, allow_outside: bool, file: Path | str, line: int) -> str:
    """`image` (a path from line `line` of annotation file `file`), checked to lie inside `root`.

    The check is on the path's text (`..`, absolute paths; no file is touched, millions of stats are
    slow): symbolic links inside the root are followed, as whoever can make them owns the data.
    `allow_outside` (`allow_outside_root` of the source's table) accepts any path. Returns `image` as stored.
    """
    if not image:
        raise AnnotationError(file, line, "no image path")
    if "\x00" in image:
        raise AnnotationError(file, line, f"image path {image!r} contains a NUL character")
    try:
        image.encode()
    except UnicodeEncodeError:
        raise AnnotationError(file, line, f"image path {image!r} is not valid Unicode") from None
    if not allow_outside:
        base = os.path.abspath(root)
        full = os.path.normpath(os.path.join(base, image))
        if os.path.commonpath([base, full]) != base or full == base:
            raise AnnotationError(file, line, f"image path {image!r} leads outside the root ({base}); "
                                              "set allow_outside_root = true in the source's table [data.<source>] if that is intended")
    return image


class DuplicateCheck:
    """Refuses an image listed twice in one annotation file (paths compared after normalisation).

    Keeps a 64-bit hash per path, not the path, so millions of lines fit in little memory.
    """

    def __init__(self, file: Path | str) -> None:
        self.file, self.first_line = file, {}

    def add(self, image: str, line: int, file: Path | str | None = None) -> None:
        """`file`: where the line is, when one check spans several files (one per split)."""
        where = (str(file or self.file), line)
        first = self.first_line.setdefault(hash(os.path.normpath(image)), where)
        if first != where:
            elsewhere = f" of {first[0]}" if first[0] != where[0] else ""
            raise AnnotationError(where[0], line, f"image {image!r} is listed twice, first on line {first[1]}{elsewhere}")


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark dropped); a line that is not UTF-8,
    or a file that cannot be read, raises `AnnotationError` naming it."""
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    yield raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise AnnotationError(path, line_no, f"not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise AnnotationError(path, None, f"cannot read: {err.strerror or err}") from None


def read_label_names(path: str | Path) -> LabelSpace:
    """The label space a `.txt` or `.json` label names file describes."""
    path = Path(path)
    if path.suffix == ".txt":
        names: dict[str, None] = {}                       # ordered, with O(1) membership
        for line_no, line in enumerate(text_lines(path), 1):
            name = line.strip()
            if name and not name.startswith("#"):
                if name in names:
                    raise AnnotationError(path, line_no, f"label '{name}' is named twice")
                names[name] = None
        if not names:
            raise AnnotationError(path, 1, "no label names")
        return LabelSpace(tuple(names))
    if path.suffix == ".json":
        try:
            data = json.loads("".join(text_lines(path)))
            if isinstance(data, list):
                return LabelSpace(_label_list(data))
            names, groups = [], []
            if not isinstance(data, dict) or not isinstance(data["groups"], list) or not data["groups"]:
                raise TypeError('expected a list of names or {"groups": [...]} with at least one group')
            for g in data["groups"]:
                start = len(names)
                names.extend(_label_list(g["labels"]))
                if not isinstance(g["name"], str) or not isinstance(g.get("exclusive", False), bool):
                    raise TypeError("a group's name must be a string and exclusive true or false")
                groups.append(Group(g["name"], tuple(range(start, len(names))), g.get("exclusive", False)))
            return LabelSpace(tuple(names), tuple(groups))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as err:
            if isinstance(err, AnnotationError):
                raise
            raise AnnotationError(path, getattr(err, "lineno", 1), f"not a label names file: {err!r}") from None
    raise AnnotationError(path, 1, "label names file must end in .txt or .json")


def _label_list(names: object) -> tuple[str, ...]:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() == n and n for n in names):
        raise TypeError("labels must be a non-empty list of names (strings without surrounding spaces)")
    return tuple(names)


def read_annotations(path: Path, label_space: LabelSpace, root: Path | None = None,
                     allow_outside_root: bool = False, split: str = "") -> Iterator[Entry]:
    """The entries of each line, checked, streamed. `split`: the split of every line (one file per split).

    Each image once, and (unless `allow_outside_root`) inside `root` (default: the file's folder).
    """
    root = path.parent if root is None else root
    seen = DuplicateCheck(path)
    index = {name: i for i, name in enumerate(label_space.names)}
    if path.suffix == ".csv":
        lines = _csv_lines(path)
    elif path.suffix in (".jsonl", ".ndjson"):
        lines = _jsonl_lines(path)
    else:
        raise AnnotationError(path, 1, "annotation file must end in .csv or .jsonl")
    for line_no, image, positives, negatives, own_split in lines:
        resolve_image_path(root, image, allow_outside_root, path, line_no)
        seen.add(image, line_no)
        pos, neg = [], []
        for names, out, kind in ((positives, pos, "positive"), (negatives, neg, "negative")):
            for name in names:
                if name not in index:
                    raise AnnotationError(path, line_no, f"unknown label '{name}' ({kind}); it is not in the label names file")
                out.append(index[name])
        check_labels(path, line_no, pos, neg, label_space)
        if own_split and own_split not in SPLITS:
            raise AnnotationError(path, line_no, f"split '{own_split}' is not one of {', '.join(SPLITS)}")
        if split and own_split and own_split != split:
            raise AnnotationError(path, line_no, f"split '{own_split}' in the {split} file")
        yield Entry(image, pos, neg, split or own_split, path, line_no)


def check_labels(path: Path, line_no: int, pos: list[int], neg: list[int], label_space: LabelSpace) -> None:
    """A line's label indices: none twice, none both positive and negative."""
    if len(set(pos)) != len(pos) or len(set(neg)) != len(neg):
        raise AnnotationError(path, line_no, "a label is listed twice")
    both = set(pos) & set(neg)
    if both:
        raise AnnotationError(path, line_no, f"label '{label_space.names[both.pop()]}' is both positive and negative")


def _csv_lines(path: Path) -> Iterator[tuple[int, str, list[str], list[str], str]]:
    reader = csv.reader(text_lines(path))
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = {"path", "positives"} - set(header)
        unknown = set(header) - set(COLUMNS)
        if missing or unknown:
            raise AnnotationError(path, 1, f"the header must name path, positives[, negatives][, split]; got {','.join(header) or 'nothing'}")
        if len(set(header)) != len(header):
            raise AnnotationError(path, 1, f"the header names a column twice: {','.join(header)}")
        col = {name: header.index(name) for name in header}
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                raise AnnotationError(path, reader.line_num, f"{len(cells)} fields, the header has {len(header)}")
            labels = [[n.strip() for n in cells[col[k]].split(SEPARATOR) if n.strip()] if k in col else [] for k in ("positives", "negatives")]
            split = cells[col["split"]].strip() if "split" in col else ""
            yield reader.line_num, cells[col["path"]].strip(), labels[0], labels[1], split
    except csv.Error as err:
        raise AnnotationError(path, reader.line_num, f"bad CSV: {err}") from None


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str, list[str], list[str], str]]:
    for line_no, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            raise AnnotationError(path, line_no, f"bad JSON: {err}") from None
        if not isinstance(item, dict) or set(item) - set(COLUMNS):
            raise AnnotationError(path, line_no, "a line must be an object with keys path, positives[, negatives][, split]")
        lists = [item.get(k, []) for k in ("positives", "negatives")]
        if not all(isinstance(item.get(k, ""), str) for k in ("path", "split")) or \
                not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in lists):
            raise AnnotationError(path, line_no, "path and split must be strings and positives/negatives lists of label names")
        yield line_no, item.get("path", ""), lists[0], lists[1], item.get("split", "")


def write_index(entries: Iterable[Entry], label_space: LabelSpace, root: Path, out: Path, kind: str, origin: Path | str,
                allow_outside_root: bool = False) -> dict:
    """Stream `entries` into `out` (labels/, paths, split.npy when they carry splits); returns source.json's content.

    Every reader's paths are checked here: inside `root` unless `allow_outside_root`
    (`resolve_image_path`), and each image once across all files, so no image is in two splits.
    Every entry has a split or none does: a source is split by its annotations or at random, never half and half.
    `origin` (the annotation file, or folder) is named when there is no entry at all.
    """
    seen = DuplicateCheck(origin)
    builder = LabelStoreBuilder(out / "labels", label_space.num_labels)
    paths = StringColumnWriter(out / "paths")
    codes = {name: k for k, name in enumerate(SPLITS)}
    first: Entry | None = None
    with open(out / "split.raw", "wb") as split_file:
        for entry in entries:
            first = first or entry
            if bool(entry.split) != bool(first.split):
                with_split, without = (entry, first) if entry.split else (first, entry)
                raise AnnotationError(without.file, without.line, f"no split, but {with_split.file}:{with_split.line} has one")
            resolve_image_path(root, entry.path, allow_outside_root, entry.file, entry.line)
            seen.add(entry.path, entry.line, entry.file)
            paths.add(entry.path)
            builder.add(entry.positives, entry.negatives)
            split_file.write(np.int8(codes.get(entry.split, -1)).tobytes())
    if first is None:
        raise AnnotationError(origin, 1, "no annotated images")
    builder.close()
    paths.close()
    if first.split:
        finish_npy(out / "split.raw", out / "split.npy", np.dtype(np.int8), paths.count)
    else:
        (out / "split.raw").unlink()
    return {"kind": kind, "root": str(root.resolve()), "label_space": label_space.to_dict()}


def split_files(annotations: str | Path | dict) -> dict[str, Path]:
    """An annotation `file` setting as {split: file}: one file (split "") or one file per split name."""
    if isinstance(annotations, dict):
        bad = set(annotations) - set(SPLITS)
        if bad or not annotations:
            raise AnnotationError("annotation files", 1, f"split files must be named {', '.join(SPLITS)}; got {', '.join(annotations) or 'none'}")
        return {split: Path(file) for split, file in annotations.items()}
    return {"": Path(annotations)}


class IndexedSource(FileSource):
    """A file source whose index a reader builds from annotation files; cached by their signature.

    Args:
        kind: the source's name (cache folder prefix, messages).
        files: the input files the index depends on (the first keys the default cache folder).
        root: folder image paths are relative to.
        image_size: images are decoded to (3, image_size, image_size) (centre square).
        read: out folder -> source.json content (see `write_index`).
        store: where the index is cached (default: under $MLML_CACHE, keyed by the first file).
        extra: anything else the index depends on (options), part of the signature.
        allow_outside_root: the index accepts image paths leading outside `root` (part of the signature).
    """

    def __init__(self, kind: str, files: list[Path], root: Path, image_size: int, read: Callable[[Path], dict],
                 store: str | Path | None = None, extra: Iterable = (), allow_outside_root: bool = False) -> None:
        signature = [*file_signature(*files), str(root.resolve()), *extra, *(["outside"] if allow_outside_root else [])]
        store = Path(store) if store else default_store_dir(kind, files[0])
        super().__init__(cached_index(store, signature, read), image_size)


class AnnotationSource(IndexedSource):
    """Images listed in annotation files, with the labels (and splits) they give them.

    Args:
        annotations: the `.csv` or `.jsonl` annotation file, or {split: file}, one per split.
        label_names: the `.txt` or `.json` label names file.
        root: folder the image paths are relative to (default: the (first) annotation file's folder).
        image_size: images are decoded to (3, image_size, image_size) (centre square).
        store: where the index is cached (default: under $MLML_CACHE, keyed by the file's path).
        allow_outside_root: accept image paths that lead outside `root` (`allow_outside_root` of the source's table).
    """

    def __init__(self, annotations: str | Path | dict, label_names: str | Path, root: str | Path | None, image_size: int,
                 store: str | Path | None = None, allow_outside_root: bool = False) -> None:
        files, label_names = split_files(annotations), Path(label_names)
        root = Path(root) if root else next(iter(files.values())).parent
        label_space = read_label_names(label_names)
        first = next(iter(files.values()))

        def read(out: Path) -> dict:
            entries = (e for split, file in files.items() for e in read_annotations(file, label_space, root, allow_outside_root, split))
            return write_index(entries, label_space, root, out, "annotations", first, allow_outside_root)

        super().__init__("annotations", [*files.values(), label_names], root, image_size, read, store, [sorted(files)], allow_outside_root)
