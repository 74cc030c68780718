"""An ImageNet-style image folder: one sub-folder per class, its name the class label.

    root/n01440764/a.JPEG, root/n01443537/b.JPEG, ...   (or root/cat/1.png, root/dog/2.png)

Classes are the sub-folder names, sorted; images are the files with an image suffix directly in
a class folder, sorted by (class, file name). The folder's class is the image's one positive
label, and it is all that is known: with the `annotated` observation model training observes that
positive only, and evaluation counts every other class negative (one label per image, as in
ImageNet). Labels form one exclusive group, `object`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlml.data.image_files import IMAGE_SUFFIXES, FileSource, FileSourceSettings, StringColumnWriter, cached_index, default_store_dir
from mlml.data.label_store import LabelStoreBuilder
from mlml.labels import Group, LabelSpace
from mlml.settings import must



@dataclass(kw_only=True)
class FolderSettings(FileSourceSettings):
    """`[data.folder]`: an image folder of class folders."""

    root: str                     # the folder of class folders (root/<class>/<image>)

    def __post_init__(self) -> None:
        super().__post_init__()
        must(bool(self.root), "root", "the folder of class folders", self.root)


def class_folders(root: Path) -> list[str]:
    """Sorted names of the sub-folders of `root` (hidden ones excluded)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    return names


def folder_label_space(classes: list[str]) -> LabelSpace:
    return LabelSpace(tuple(classes), (Group("object", tuple(range(len(classes))), exclusive=True),))


def build_folder_index(root: Path, classes: list[str], out: Path) -> dict:
    """Scan the class folders into `out` (labels/ and paths); returns the source.json content."""
    builder = LabelStoreBuilder(out / "labels", len(classes))
    paths = StringColumnWriter(out / "paths")
    count = 0
    for c, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(root / name) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
        for file in files:
            paths.add(f"{name}/{file}")
            builder.add((c,))
        count += len(files)
    if count == 0:
        raise ValueError(f"image folder {root} holds no images with suffixes {', '.join(IMAGE_SUFFIXES)}")
    builder.close()
    paths.close()
    return {"kind": "folder", "root": str(root.resolve()), "label_space": folder_label_space(classes).to_dict()}


class ImageFolderSource(FileSource):
    """Images of `root/<class>/<file>` with their folder's class as the one positive label.

    Args:
        root: the folder of class folders.
        image_size: images are decoded to (3, image_size, image_size) (centre square).
        store: where the index is cached (default: under $MLML_CACHE, keyed by the root's path).
    """

    def __init__(self, root: str | Path, image_size: int, store: str | Path | None = None) -> None:
        root = Path(root)
        classes = class_folders(root)
        # A class folder's mtime changes when files are added to or removed from it.
        signature = [str(root.resolve()), [[c, os.stat(root / c).st_mtime_ns] for c in classes]]
        store = Path(store) if store else default_store_dir("folder", root)
        super().__init__(cached_index(store, signature, lambda out: build_folder_index(root, classes, out)), image_size)
