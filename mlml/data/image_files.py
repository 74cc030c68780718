"""Images stored as files: decoding, the column of paths, and the cached index of a file source.

A file source (an image folder, an annotation file) is indexed once into a *store directory*:
the label store (`labels/`, see `mlml.data.label_store`), the image paths as one memory-mapped
column (`paths.npy` bytes + `path_offsets.npy`), for a source with its own splits `split.npy`
(int8 per image: index in `SPLITS`, -1 = in no split), and `source.json` (label space, root, and
the signature of the inputs it was built from). The next run with unchanged inputs opens it instead
of rebuilding; ranks that build at the same time each build privately and the first rename wins.

An image that cannot be decoded (missing, corrupt, truncated, not an image) raises
`UnreadableImageError` naming the file; the dataset turns that into a skipped, counted item
(see `mlml.data.dataset`) or, with `data.strict`, a stopped run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from mlml.data.label_store import LabelStore, finish_npy, load_npy
from mlml.labels import LabelSpace
from mlml.settings import must

SPLITS = ("train", "val", "test")   # split names; a store's `split.npy` holds their index, -1 = in none
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(kw_only=True)
class FileSourceSettings:
    """What every file source's table (`[data.folder]`, `[data.annotations]`, ...) has."""

    image_size: int = 64          # images decoded to (3, S, S), centre square

    def __post_init__(self) -> None:
        must(8 <= self.image_size <= 1024, "image_size", "in [8, 1024]", self.image_size)


class UnreadableImageError(RuntimeError):
    """An image file could not be read or decoded."""


def decode_image(path: str | Path, size: int) -> torch.Tensor:
    """uint8 (3, size, size): the file's centre square, resized (bilinear) to `size` pixels.

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) still >= `size` on both sides
    (`Image.draft`), so a 400 x 300 photo for 32 px images decodes at 50 x 38. Per image: one decode,
    one resize, one copy into the (3, S, S) tensor."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))               # JPEG: decode at the smallest scale >= size
            if im.mode != "RGB":
                im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            pixels = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0))  # (S, S, 3)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from None
    out = torch.empty(3, size, size, dtype=torch.uint8)
    out.numpy()[...] = pixels.transpose(2, 0, 1)       # (3, S, S): the one copy
    return out


class StringColumnWriter:
    """Streams strings to `<prefix>.npy` (uint8 bytes) and `<prefix>_offsets.npy` (int64, N + 1)."""

    def __init__(self, prefix: Path, flush: int = 1 << 16) -> None:
        self.prefix, self.flush_size = prefix, flush
        self._data = open(f"{prefix}.raw", "wb")
        self._ends = open(f"{prefix}_offsets.raw", "wb")
        self._ends.write(np.zeros(1, dtype=np.int64).tobytes())
        self._buffer: list[bytes] = []
        self.count, self.nbytes = 0, 0

    def add(self, text: str) -> None:
        self._buffer.append(text.encode())
        if len(self._buffer) >= self.flush_size:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            ends = np.cumsum([len(b) for b in self._buffer], dtype=np.int64) + self.nbytes
            self._data.write(b"".join(self._buffer))
            self._ends.write(ends.tobytes())
            self.count, self.nbytes = self.count + len(self._buffer), int(ends[-1])
            self._buffer = []

    def close(self) -> None:
        self.flush()
        self._data.close()
        self._ends.close()
        finish_npy(Path(f"{self.prefix}.raw"), Path(f"{self.prefix}.npy"), np.dtype(np.uint8), self.nbytes)
        finish_npy(Path(f"{self.prefix}_offsets.raw"), Path(f"{self.prefix}_offsets.npy"), np.dtype(np.int64), self.count + 1)


class StringColumn:
    """Read side of `StringColumnWriter`: `column[i]` is the i-th string (O(1), memory-mapped)."""

    def __init__(self, prefix: Path) -> None:
        self.data = load_npy(Path(f"{prefix}.npy"))
        self.offsets = load_npy(Path(f"{prefix}_offsets.npy"))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.data[int(self.offsets[i]) : int(self.offsets[i + 1])]).decode()


def file_signature(*paths: Path) -> list:
    """What a cached index depends on: each input's path, size and modification time."""
    return [[str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


def default_store_dir(kind: str, key: Path) -> Path:
    """$MLML_CACHE (default ~/.cache/mlml) / <kind>-<hash of the input's absolute path>."""
    cache = Path(os.environ.get("MLML_CACHE", Path.home() / ".cache" / "mlml"))
    digest = hashlib.sha1(str(Path(key).resolve()).encode()).hexdigest()[:16]
    return cache / f"{kind}-{digest}"


def cached_index(store: Path, signature: list, build: Callable[[Path], dict]) -> Path:
    """The store directory for `signature`: reused when it matches, else built by `build(tmp_dir)`.

    `build` writes `labels/` and `paths*.npy` into the directory it is given and returns what goes
    into `source.json` (besides the signature). A failed build leaves nothing behind.
    """
    meta = store / "source.json"
    if meta.exists() and json.loads(meta.read_text()).get("signature") == signature:
        return store
    if store.exists() and any(store.iterdir()) and not meta.exists():
        raise FileExistsError(f"{store} exists and is not an mlml store directory (no source.json); choose another data.store")
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{store.name}-", dir=store.parent))
    try:
        info = build(tmp)
        (tmp / "source.json").write_text(json.dumps({**info, "signature": signature}, indent=1))
        if store.exists():
            shutil.rmtree(store, ignore_errors=True)
        os.replace(tmp, store)
    except OSError:
        if not (meta.exists() and json.loads(meta.read_text()).get("signature") == signature):
            raise                                   # not a lost race with another rank
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return store


class FileSource:
    """A source whose images are files listed in an index built by `cached_index`.

    Attributes:
        label_space, labels: the source's labels (labels memory-mapped from `<store>/labels`).
        root: image paths are relative to it.
        image_size: images are decoded to (3, image_size, image_size).
        default_observation: what training observes unless `data.observation` says otherwise.
    """

    default_observation = "annotated"

    def __init__(self, store: Path, image_size: int) -> None:
        info = json.loads((store / "source.json").read_text())
        self.store, self.image_size = store, image_size
        self.root = Path(info["root"])
        self._root = str(self.root)
        self.label_space = LabelSpace.from_dict(info["label_space"])
        self.labels = LabelStore.open(store / "labels")
        self.paths = StringColumn(store / "paths")
        self.split = load_npy(store / "split.npy") if (store / "split.npy").exists() else None

    @property
    def fixed_splits(self) -> dict[str, np.ndarray] | None:
        """The source's own splits (split name -> sorted rows), or None when it has none."""
        if self.split is None:
            return None
        return {name: np.flatnonzero(np.asarray(self.split) == k) for k, name in enumerate(SPLITS)}

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        return self.root / self.paths[i]

    def image(self, i: int) -> torch.Tensor:
        """uint8 (3, S, S); raises `UnreadableImageError` for a file that cannot be decoded."""
        return decode_image(os.path.join(self._root, self.paths[i]), self.image_size)  # str join: ~4x pathlib's
