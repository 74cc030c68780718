"""Procedurally drawn colour-plus-object images: the library's built-in default data.

Each image shows 1-3 (configurable) coloured shapes on a non-uniform, low-saturation background.
Its labels are the union of its objects' colours ("red", "blue", ...; group "colour") and shapes
("circle", "star", ...; group "object"). Nothing is stored on disk: image i is a pure function of
`(cfg, seed, i)`, drawn from its own generator `np.random.default_rng([seed, 0, i])`, so it does
not depend on `n` or on the order in which images are asked for. Labels come from the sampled
parameters without rendering.

Rendering is vectorised over a batch: every shape is an implicit function (a signed distance in
object coordinates), antialiased by clamping the distance in pixels, and objects are alpha-blended
in drawing order (later ones occlude earlier ones) over a background made of a gradient between two
grey-ish tints and a crop of a grey texture. Gaussian noise and textures are crops of pools made
once from the seed. Per-pixel work uses only +, -, *, /, sqrt, abs, sign and min/max, which are
exactly rounded in IEEE arithmetic, so a batch renders bit-identically to its images one by one.

Difficulty knobs (see `SyntheticConfig`): label frequency skew, colour jitter within a class,
background clutter, pixel noise, object size and rotation, occlusion. Colours are easy (a small
CNN reaches AP ~1.0) and shapes carry the difficulty: star, diamond, cross and bar are the hardest,
and rotation is the strongest knob (any angle makes thin shapes much harder at 32 px). Hard pair by
design: "brown" is a dark, less saturated orange (same hue family, value 0.45 against 0.95); it
only appears with `num_colours >= 8`. With the defaults, a 4-layer CNN (width 32) trained 10
epochs on 4000 images with full labels reached macro mAP 0.83 on 1000 others, and 0.64 from one
positive per image with the rest assumed negative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mlml.data.label_store import LabelStore
from mlml.labels import Group, LabelSpace
from mlml.settings import must

# Colour classes as (hue in degrees, saturation, value), ordered from most to least frequent
# under a skewed label distribution. Hue gaps are >= 27 degrees between classes of similar
# saturation and value; pink is told from red/purple also by its low saturation, brown from
# orange by its low value.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.85, 0.9),
    "blue": (220.0, 0.8, 0.9),
    "green": (125.0, 0.75, 0.75),
    "yellow": (55.0, 0.85, 0.95),
    "purple": (280.0, 0.65, 0.8),
    "orange": (28.0, 0.9, 0.95),
    "cyan": (185.0, 0.8, 0.85),
    "brown": (25.0, 0.75, 0.45),
    "pink": (325.0, 0.45, 1.0),
    "lime": (85.0, 0.8, 0.85),
}

# Shape classes, ordered from most to least frequent under a skewed label distribution.
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "ring", "star", "diamond", "bar", "crescent", "arrow",
)

# Pattern classes (the conditional "pattern" group, opt-in with `num_patterns`): a darker texture
# drawn inside the objects whose shape is one of `pattern_shapes`; other shapes are plain, so the
# pattern group does not apply to images without such a shape.
PATTERNS: tuple[str, ...] = ("stripes", "dots", "checks")
_PATTERN_PERIOD = 0.5  # pattern period in object radii
_PATTERN_DARKEN = 0.55  # the pattern multiplies the object colour by 1 - this

# Object placement: candidate centres tried per object; with occlusion, two centres are at least
# this fraction of the sum of the radii apart, so no object is hidden by a later one.
_CANDIDATES = 8
_OCCLUDED_SEPARATION = 0.6
_PER_OBJECT = 7 + 2 * _CANDIDATES  # uniforms per object: shape, colour, radius, angle, h, s, v, centres
_PER_IMAGE = 16  # uniforms per image (13 used)
_NOISE_POOL = 1 << 20  # float32 Gaussian values shared by the images of a source (4 MB)
_TEXTURES = 64  # background textures of a source
_CHUNK_PIXELS = 1 << 15  # images are rendered in chunks of about this many pixels


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic source (plain types only: loaded from TOML).

    Attributes:
        image_size: side S of the square images, in pixels.
        num_colours: colour classes, the first of `PALETTE` (at most 10).
        num_shapes: object classes, the first of `SHAPES` (at most 10).
        min_objects, max_objects: objects per image, uniform in [min, max].
        frequency_skew: Zipf exponent of the class distributions (p_k ∝ (k+1)^-skew, k = class
            rank); 0 gives uniform classes.
        colour_jitter: within-class colour variation in [0, 1]: hue ±12°·j, saturation and value
            ±0.25·j (hue gaps between classes are >= 27°).
        clutter: amount of grey background texture (waves and soft blobs) in [0, 1]; 1 gives a
            texture std of 0.06 to 0.18 (pixel values in [0, 1]).
        noise: standard deviation of the Gaussian pixel noise (pixel values in [0, 1]).
        occlusion: objects may overlap, later ones in front; if False they are kept apart
            when there is room.
        min_scale, max_scale: object radius as a fraction of the image size.
        rotation: objects are rotated by a uniform angle in ±rotation degrees (180 = any angle).
        edge: width in pixels of the antialiased edge (soft edges; 0 = hard edges).
        nuisance: "none" (the default, images as described above) or "collection": the
            shortcut scenario. Training images carry the background style of their collection
            (their observation model's `domain`, e.g. the group of `per_group`), every other
            image a style drawn at random, independent of its labels. See `nuisance_styles`.
            "random": every image, training images too, a style drawn at random: the same styled
            images without the shortcut (the scenario's shortcut-free reference).
        nuisance_style: what a style is: "tint" (the background's two tints get the style's hue at
            saturation `nuisance_strength`; default backgrounds are greyish, saturation <= 0.12) or
            "stripes" (a grey grating of period 3 px over the background, oriented at 180° k / D
            for style k of D, amplitude `nuisance_strength` / 3 in pixel values: colour-free, so
            it is not entangled with the colour labels).
        nuisance_strength: strength of a style (see `nuisance_style`).
        num_patterns: pattern classes, the first of `PATTERNS` (at most 3); 0 (default) = no
            pattern group, the images and labels of the colour+object data unchanged. With
            patterns, each object whose shape is in `pattern_shapes` carries one pattern (uniform
            over the classes, drawn from its own generator); the label space gains a group
            "pattern" with an unknown class that applies only to images showing such a shape.
        pattern_shapes: shape names that carry a pattern (among the first `num_shapes`).
    """

    image_size: int = 32
    num_colours: int = 6
    num_shapes: int = 8
    min_objects: int = 1
    max_objects: int = 3
    frequency_skew: float = 1.2
    colour_jitter: float = 0.5
    clutter: float = 0.4
    noise: float = 0.03
    occlusion: bool = True
    min_scale: float = 0.2
    max_scale: float = 0.3
    rotation: float = 15.0
    edge: float = 1.0
    nuisance: str = "none"
    nuisance_style: str = "tint"
    nuisance_strength: float = 0.35
    num_patterns: int = 0
    pattern_shapes: list[str] = field(default_factory=lambda: ["circle", "square"])

    def __post_init__(self) -> None:
        checks = {
            "image_size": (8 <= self.image_size <= 256, "in [8, 256]"),   # textures take 64 (2S)^2 floats
            "num_colours": (1 <= self.num_colours <= len(PALETTE), f"in [1, {len(PALETTE)}]"),
            "num_shapes": (1 <= self.num_shapes <= len(SHAPES), f"in [1, {len(SHAPES)}]"),
            "min_objects": (1 <= self.min_objects <= self.max_objects, "in [1, max_objects]"),
            "max_objects": (self.max_objects <= 8, "<= 8"),
            "frequency_skew": (self.frequency_skew >= 0, ">= 0"),
            "colour_jitter": (0 <= self.colour_jitter <= 1, "in [0, 1]"),
            "clutter": (0 <= self.clutter <= 1, "in [0, 1]"),
            "noise": (self.noise >= 0, ">= 0"),
            "min_scale": (0 < self.min_scale <= self.max_scale, "in (0, max_scale]"),
            "max_scale": (self.max_scale <= 0.5, "<= 0.5"),
            "rotation": (0 <= self.rotation <= 180, "in [0, 180]"),
            "edge": (self.edge >= 0, ">= 0"),
            "nuisance": (self.nuisance in ("none", "collection", "random"), "'none', 'collection' or 'random'"),
            "nuisance_style": (self.nuisance_style in ("tint", "stripes"), "'tint' or 'stripes'"),
            "nuisance_strength": (0 <= self.nuisance_strength <= 1, "in [0, 1]"),
            "num_patterns": (0 <= self.num_patterns <= len(PATTERNS), f"in [0, {len(PATTERNS)}]"),
            "pattern_shapes": (bool(self.pattern_shapes) and set(self.pattern_shapes) <= set(SHAPES[: self.num_shapes]),
                               "non-empty names among the first num_shapes shapes"),
        }
        for name, (ok, rule) in checks.items():
            must(ok, name, rule, getattr(self, name))


@dataclass(frozen=True)
class SyntheticObject:
    """One drawn object: classes, pose in pixels (x right, y down), angle in radians, RGB in [0, 1]."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float
    angle: float
    rgb: tuple[float, float, float]
    pattern: str = ""  # "" = plain


class SyntheticSource:
    """n procedurally drawn images with their full labels (a data source, see `mlml.data`).

    Args:
        cfg: drawing parameters.
        n: number of images.
        seed: fixes every image: image i depends only on (cfg, seed, i).
    """

    def __init__(self, cfg: SyntheticConfig, n: int, seed: int) -> None:
        self.cfg = cfg
        self.n = n
        self.seed = seed
        self.label_space = synthetic_label_space(cfg)
        self._params = _sample_params(cfg, n, seed)
        p = self._params
        nc, ns = cfg.num_colours, cfg.num_shapes
        image_of = np.repeat(np.arange(n), cfg.max_objects)[p["present"].reshape(-1)]
        dense = np.zeros((n, self.label_space.num_labels), dtype=bool)
        dense[image_of, p["colour"][p["present"]]] = True
        dense[image_of, nc + p["shape"][p["present"]]] = True
        if cfg.num_patterns:
            patterned = p["present"] & (p["pattern"] >= 0)
            image_of = np.repeat(np.arange(n), cfg.max_objects)[patterned.reshape(-1)]
            dense[image_of, nc + ns + p["pattern"][patterned]] = True
        self.labels = LabelStore.from_dense(dense)
        # Pools shared by all images of the source, fixed by the seed alone.
        self._noise = np.random.default_rng([seed, 1]).standard_normal(_NOISE_POOL, dtype=np.float32)
        self._textures = _texture_bank(cfg.image_size, seed)                      # (M, 2S, 2S)
        g = np.arange(cfg.image_size, dtype=np.float32) + np.float32(0.5)         # pixel centres
        self._grid = (np.tile(g, cfg.image_size), np.repeat(g, cfg.image_size))  # x, y: (P,) each

    def __len__(self) -> int:
        return self.n

    def objects(self, i: int) -> list[SyntheticObject]:
        """The objects of image i, in drawing order (later ones in front)."""
        p, names, nc = self._params, self.label_space.names, self.cfg.num_colours
        return [
            SyntheticObject(
                shape=names[nc + int(p["shape"][i, k])],
                colour=names[int(p["colour"][i, k])],
                x=float(p["x"][i, k]),
                y=float(p["y"][i, k]),
                radius=float(p["radius"][i, k]),
                angle=float(p["angle"][i, k]),
                rgb=tuple(float(c) for c in p["rgb"][i, k]),
                pattern=PATTERNS[int(p["pattern"][i, k])] if "pattern" in p and p["pattern"][i, k] >= 0 else "",
            )
            for k in range(self.cfg.max_objects)
            if p["present"][i, k]
        ]

    @property
    def styled_by_collection(self) -> bool:
        """Whether `build_data` gives the images their collection's style (`nuisance = "collection"`)."""
        return self.cfg.nuisance == "collection"

    @property
    def styled_at_random(self) -> bool:
        """Whether `build_data` gives every image a random style (`nuisance = "random"`)."""
        return self.cfg.nuisance == "random"

    def set_styles(self, styles: np.ndarray, num_styles: int) -> None:
        """Give image i the background style `styles[i]` (int (n,) in [0, num_styles)).

        "tint": a style replaces the hue and saturation of the image's two background tints: hue
        160° + 360° s / num_styles (±15° per tint), saturation `nuisance_strength`; their value
        (brightness), the gradient, texture and objects are unchanged. "stripes": a grating is
        added to the background (see `SyntheticConfig.nuisance_style`). Labels are unchanged."""
        styles = np.asarray(styles, dtype=np.int64)
        if styles.shape != (self.n,) or styles.min(initial=0) < 0 or styles.max(initial=0) >= num_styles:
            raise ValueError(f"styles must be {self.n} integers in [0, {num_styles})")
        u = np.random.default_rng([self.seed, 3]).random((self.n, 2))
        if self.cfg.nuisance_style == "stripes":
            angle = np.pi * styles / num_styles + np.deg2rad(10.0) * (2 * u[:, 0] - 1)        # (n,)
            k = 2 * np.pi / 3.0                                                              # period 3 px
            self._params["stripe_dir"] = (k * np.stack([np.cos(angle), np.sin(angle)], -1)).astype(np.float32)
            self._params["stripe_phase"] = (2 * np.pi * u[:, 1]).astype(np.float32)
            return
        hue = 160.0 + 360.0 * styles[:, None] / num_styles + 15.0 * (2 * u - 1)             # (n, 2)
        value = self._params["tint"].max(-1).astype(np.float64)                              # (n, 2): HSV value
        sat = np.full_like(value, self.cfg.nuisance_strength)
        self._params["tint"] = _hsv_to_rgb(hue, sat, value).astype(np.float32)

    def image(self, i: int) -> torch.Tensor:
        """uint8 (3, S, S): image i."""
        return self.images([i])[0]

    def images(self, indices: np.ndarray | torch.Tensor | list[int]) -> torch.Tensor:
        """uint8 (B, 3, S, S): the images of `indices`, rendered together; equal to stacking `image`."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"image index outside [0, {self.n}) in {rows}")
        S = self.cfg.image_size
        out = np.empty((len(rows), 3, S * S), dtype=np.uint8)
        chunk = max(1, _CHUNK_PIXELS // (S * S))  # keeps the float32 work arrays in cache
        for start in range(0, len(rows), chunk):
            out[start : start + chunk] = self._render(rows[start : start + chunk])
        return torch.from_numpy(out.reshape(len(rows), 3, S, S))

    def _render(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (B, 3, P): images `rows`, pixels flattened (P = S * S)."""
        p = {k: v[rows] for k, v in self._params.items()}
        img = self._background(p)                                                 # (B, 3, P) in [0, 1]
        alpha, shade = self._coverage(p)                                          # (B, K, P) each
        for k in range(self.cfg.max_objects):  # back to front: later objects occlude earlier ones
            if p["present"][:, k].any():
                colour = p["rgb"][:, k, :, None]                                  # (B, 3, 1)
                if shade is not None:
                    colour = colour * shade[:, k, None]                           # (B, 3, P)
                blend = colour - img                                              # (B, 3, P)
                blend *= alpha[:, k, None]                                        # 0 where absent
                img += blend
        img *= np.float32(255)
        if self.cfg.noise > 0:
            windows = np.lib.stride_tricks.sliding_window_view(self._noise, img[0].size)
            start = (p["noise_start"] * (len(windows) - 1)).astype(np.int64)
            noise = windows[start].reshape(img.shape)                             # (B, 3, P), a copy
            noise *= np.float32(255 * self.cfg.noise)
            img += noise
        img += np.float32(0.5)
        np.clip(img, np.float32(0), np.float32(255), out=img)
        return img.astype(np.uint8)

    def _background(self, p: dict[str, np.ndarray]) -> np.ndarray:
        """float32 (B, 3, P): a gradient between two grey-ish tints, plus a crop of a grey texture."""
        X, Y = self._grid
        t = _linear(p["g_dir"][:, 0], p["g_dir"][:, 1], p["g_offset"], X, Y)      # (B, P) about [0, 1]
        t0, t1 = p["tint"][:, 0, :, None], p["tint"][:, 1, :, None]               # (B, 3, 1)
        img = (t1 - t0) * t[:, None]                                              # (B, 3, P)
        img += t0
        if self.cfg.clutter > 0:
            S = self.cfg.image_size
            crops = np.lib.stride_tricks.sliding_window_view(self._textures, (S, S), axis=(1, 2))
            lum = crops[p["texture"], p["texture_y"], p["texture_x"]].reshape(len(t), 1, S * S)  # a copy
            lum *= p["texture_amp"][:, None, None]
            img += lum
        if "stripe_dir" in p:                               # the shortcut scenario's "stripes" style
            wave = np.cos(_linear(p["stripe_dir"][:, 0], p["stripe_dir"][:, 1], p["stripe_phase"], X, Y))
            img += np.float32(self.cfg.nuisance_strength / 3) * wave[:, None]
        return img

    def _coverage(self, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 (B, K, P): antialiased coverage of every object (0 where absent), shape by shape;
        and with patterns, the colour multiplier (B, K, P) of every object (1 where plain), else None."""
        B, K = p["present"].shape
        X, Y = self._grid
        alpha = np.zeros((B * K, len(X)), dtype=np.float32)
        shade = np.ones((B * K, len(X)), dtype=np.float32) if self.cfg.num_patterns else None
        flat = {k: p[k].reshape(B * K) for k in ("shape", "x", "y", "radius", "cos", "sin")}
        pattern = p["pattern"].reshape(B * K) if shade is not None else None
        present = p["present"].reshape(B * K)
        sharpness = np.float32(1 / self.cfg.edge) if self.cfg.edge > 0 else np.float32(1e6)
        for s, name in enumerate(SHAPES[: self.cfg.num_shapes]):
            rows = np.flatnonzero(present & (flat["shape"] == s))
            if len(rows) == 0:
                continue
            x, y, r = flat["x"][rows], flat["y"][rows], flat["radius"][rows]
            c, sn = flat["cos"][rows] / r, flat["sin"][rows] / r
            u = _linear(c, sn, -(c * x + sn * y), X, Y)                           # (N, P) object coordinates,
            v = _linear(-sn, c, sn * x - c * y, X, Y)                             # radius 1
            if shade is not None:
                shade[rows] = _pattern_shade(pattern[rows], u, v, r * sharpness)
            d = _SDF[name](u, v)
            d *= (r * sharpness)[:, None]                                         # distance in edge widths
            np.subtract(np.float32(0.5), d, out=d)
            alpha[rows] = np.clip(d, np.float32(0), np.float32(1), out=d)
        return alpha.reshape(B, K, len(X)), None if shade is None else shade.reshape(B, K, len(X))


def _pattern_shade(pattern: np.ndarray, u: np.ndarray, v: np.ndarray, pixels_per_unit: np.ndarray) -> np.ndarray:
    """float32 (N, P): colour multiplier in [1 - _PATTERN_DARKEN, 1] of N objects (pattern (N,),
    -1 = plain) at object coordinates u, v (N, P); antialiased like the shapes. Only exactly rounded
    operations (no trigonometry), so batches render bit-identically to single images."""
    half = np.float32(0.5)
    k = pixels_per_unit[:, None].astype(np.float32) * np.float32(_PATTERN_PERIOD)   # pixels per period

    def wave(t: np.ndarray) -> np.ndarray:  # triangle wave in [-0.5, 0.5], period 1
        t = t / np.float32(_PATTERN_PERIOD)
        return np.abs(t - np.floor(t) - half) - np.float32(0.25)

    mask = np.zeros_like(u)
    for c, name in enumerate(PATTERNS):
        rows = np.flatnonzero(pattern == c)
        if len(rows) == 0:
            continue
        wu, wv, kk = wave(u[rows]), wave(v[rows]), k[rows]
        if name == "stripes":
            m = wv * kk
        elif name == "dots":
            d = np.sqrt((wu + np.float32(0.25)) ** 2 + (wv + np.float32(0.25)) ** 2) - np.float32(0.22)
            m = -d * kk
        else:  # checks
            m = wu * wv * np.float32(4) * kk
        mask[rows] = np.clip(m + half, np.float32(0), np.float32(1))
    return np.float32(1) - np.float32(_PATTERN_DARKEN) * mask


def nuisance_styles(n: int, train_rows: np.ndarray, train_domains: np.ndarray, num_styles: int, seed: int) -> np.ndarray:
    """int64 (n,): the style of every image in the shortcut scenario (`nuisance = "collection"`).

    A training image's style is its collection (`train_domains`, e.g. which group's labels it
    carries under `per_group`), so the background tells the collection and, under assume-negative,
    which labels are "negative". Every other image (validation, test) draws its style uniformly at
    random from a hash of (seed, row), independent of its labels and collection: the shortcut fails
    there."""
    styles = np.minimum((np.random.default_rng([seed, 4]).random(n) * num_styles).astype(np.int64), num_styles - 1)
    styles[np.asarray(train_rows, dtype=np.int64)] = train_domains
    return styles


def _linear(a: np.ndarray, b: np.ndarray, c: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """float32 (N, P): a x + b y + c over the pixels, one set of coefficients (N,) per row.

    Pixels are flattened and innermost so numpy's loops run over P (much faster than broadcasting
    (S, 1) against (1, S))."""
    out = a[:, None] * X
    out += b[:, None] * Y
    out += c[:, None]
    return out


# ---------------------------------------------------------------- parameters (no pixels)

def _zipf(num: int, skew: float) -> np.ndarray:
    """float64 (num + 1,): cumulative class probabilities, p_k ∝ (k + 1)^-skew, from 0."""
    w = 1.0 / np.arange(1, num + 1, dtype=np.float64) ** skew
    return np.concatenate([[0.0], np.cumsum(w / w.sum())])


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(..., 3) RGB of hue in degrees (any real), saturation and value in [0, 1]."""
    h6 = np.mod(h, 360.0) / 60.0
    k = np.mod(np.array([5.0, 3.0, 1.0]) + h6[..., None], 6.0)                    # (..., 3)
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _sample_params(cfg: SyntheticConfig, n: int, seed: int) -> dict[str, np.ndarray]:
    """Every random choice of images 0..n-1, as arrays (n, ...) (objects: (n, K, ...)).

    Image i's choices are one block `default_rng([seed, 0, i]).random(D)`, so they do not depend
    on n; blocks are mapped to parameters with vectorised elementwise arithmetic. A block holds,
    per object k < K = max_objects, `_PER_OBJECT` values, then `_PER_IMAGE` values.
    """
    K, S, C = cfg.max_objects, cfg.image_size, _CANDIDATES
    u = np.empty((n, K * _PER_OBJECT + _PER_IMAGE))
    for i in range(n):  # about 20 us an image
        u[i] = np.random.default_rng([seed, 0, i]).random(u.shape[1])
    uo = u[:, : K * _PER_OBJECT].reshape(n, K, _PER_OBJECT)
    ui = u[:, K * _PER_OBJECT :]

    spread = K - cfg.min_objects + 1
    count = cfg.min_objects + np.minimum((ui[:, 0] * spread).astype(np.int64), spread - 1)
    present = np.arange(K) < count[:, None]                                        # (n, K)
    shape = np.searchsorted(_zipf(cfg.num_shapes, cfg.frequency_skew), uo[..., 0], side="right") - 1
    colour = np.searchsorted(_zipf(cfg.num_colours, cfg.frequency_skew), uo[..., 1], side="right") - 1
    shape, colour = np.minimum(shape, cfg.num_shapes - 1), np.minimum(colour, cfg.num_colours - 1)
    radius = S * (cfg.min_scale + (cfg.max_scale - cfg.min_scale) * uo[..., 2])
    angle = np.deg2rad(cfg.rotation) * (2 * uo[..., 3] - 1)
    hsv = np.array(list(PALETTE.values()))[colour]                                  # (n, K, 3)
    j = cfg.colour_jitter
    h = hsv[..., 0] + j * 12.0 * (2 * uo[..., 4] - 1)
    s = np.clip(hsv[..., 1] + j * 0.25 * (2 * uo[..., 5] - 1), 0.0, 1.0)
    v = np.clip(hsv[..., 2] + j * 0.25 * (2 * uo[..., 6] - 1), 0.0, 1.0)
    x, y = _place(cfg, radius, uo[..., 7 : 7 + 2 * C].reshape(n, K, C, 2))

    # Background: a gradient between two grey-ish tints (saturation <= 0.12) along a random
    # direction, plus a random crop of a random grey texture of the bank.
    tint = _hsv_to_rgb(360.0 * ui[:, 1:3], 0.12 * ui[:, 3:5], 0.35 + 0.3 * ui[:, 5:7])  # (n, 2, 3)
    g_angle = 2 * np.pi * ui[:, 7]
    g_dir = np.stack([np.cos(g_angle), np.sin(g_angle)], -1) / S                   # (n, 2) per pixel
    f32 = np.float32
    return {
        "present": present,
        "shape": shape,
        "colour": colour,
        "x": x.astype(f32),
        "y": y.astype(f32),
        "radius": radius.astype(f32),
        "angle": angle.astype(f32),
        "cos": np.cos(angle).astype(f32),
        "sin": np.sin(angle).astype(f32),
        "rgb": _hsv_to_rgb(h, s, v).astype(f32),                                   # (n, K, 3)
        "tint": tint.astype(f32),
        "g_dir": g_dir.astype(f32),
        "g_offset": (0.5 - g_dir.sum(-1) * S / 2).astype(f32),                      # t = 0.5 at the centre
        "texture": (ui[:, 8] * _TEXTURES).astype(np.int64),
        "texture_y": (ui[:, 9] * (S + 1)).astype(np.int64),
        "texture_x": (ui[:, 10] * (S + 1)).astype(np.int64),
        "texture_amp": (cfg.clutter * 0.12 * (0.5 + ui[:, 11])).astype(f32),       # std of the texture
        "noise_start": ui[:, 12],                                                  # in the noise pool
        **_sample_patterns(cfg, shape, seed),
    }


def synthetic_label_space(cfg: SyntheticConfig) -> LabelSpace:
    """Colours, shapes and (with `num_patterns`) patterns, in groups colour, object and pattern.

    Groups are exclusive when an image holds one object (`max_objects == 1`). The pattern group
    has an unknown class and applies to the images showing one of `pattern_shapes`."""
    colours, shapes, patterns = list(PALETTE)[: cfg.num_colours], SHAPES[: cfg.num_shapes], PATTERNS[: cfg.num_patterns]
    nc, ns, npat, exclusive = len(colours), len(shapes), len(patterns), cfg.max_objects == 1
    groups = [Group("colour", tuple(range(nc)), exclusive), Group("object", tuple(range(nc, nc + ns)), exclusive)]
    if npat:
        applies_to = tuple(sorted(nc + shapes.index(s) for s in set(cfg.pattern_shapes)))
        groups.append(Group("pattern", tuple(range(nc + ns, nc + ns + npat)), exclusive, True, applies_to))
    return LabelSpace(tuple(colours) + shapes + patterns, tuple(groups))


def _sample_patterns(cfg: SyntheticConfig, shape: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """{"pattern": int64 (n, K), -1 = plain} drawn from generators of their own ([seed, 3, i]), so
    the other parameters are those of the data without patterns; {} when `num_patterns` is 0."""
    if not cfg.num_patterns:
        return {}
    n, K = shape.shape
    u = np.empty((n, K))
    for i in range(n):
        u[i] = np.random.default_rng([seed, 3, i]).random(K)
    pattern = np.minimum((u * cfg.num_patterns).astype(np.int64), cfg.num_patterns - 1)
    carries = np.isin(shape, [SHAPES.index(s) for s in cfg.pattern_shapes])
    return {"pattern": np.where(carries, pattern, -1)}


def _place(cfg: SyntheticConfig, radius: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Object centres x, y (n, K): of `_CANDIDATES` uniform centres (cand (n, K, C, 2) in [0, 1)),
    the first far enough from the objects placed before, else the one that comes closest to it."""
    S = cfg.image_size
    margin = 0.8 * radius[..., None, None]                                         # may cross the edge a little
    xy = margin + (S - 2 * margin) * cand                                          # (n, K, C, 2)
    separation = _OCCLUDED_SEPARATION if cfg.occlusion else 1.0
    chosen = np.empty(radius.shape + (2,))
    for k in range(radius.shape[1]):
        score = np.full(cand.shape[:1] + cand.shape[2:3], np.inf)                  # (n, C): distance / needed
        for j in range(k):
            dist = np.sqrt(((xy[:, k] - chosen[:, j, None]) ** 2).sum(-1))
            score = np.minimum(score, dist / (separation * (radius[:, j, None] + radius[:, k, None])))
        ok = score >= 1.0
        pick = np.where(ok.any(1), ok.argmax(1), score.argmax(1))
        chosen[:, k] = xy[np.arange(len(xy)), k, pick]
    return chosen[..., 0], chosen[..., 1]


def _texture_bank(S: int, seed: int) -> np.ndarray:
    """float32 (_TEXTURES, 2S, 2S): smooth grey textures of unit std (oriented waves, soft blobs).

    Made once per source from the seed alone; images take (S, S) crops of them."""
    rng = np.random.default_rng([seed, 2])
    M, T = _TEXTURES, 2 * S
    wave_angle, wave_phase = rng.uniform(0, 2 * np.pi, (2, M, 3))
    wave_period = S * rng.uniform(0.15, 0.5, (M, 3))
    wave_amp = rng.uniform(0, 1, (M, 3))
    blob_x, blob_y = rng.uniform(0, T, (2, M, 4))
    blob_sigma = S * rng.uniform(0.08, 0.25, (M, 4))
    blob_amp = rng.uniform(-1.5, 1.5, (M, 4))                                      # lighter or darker
    g = np.arange(T) + 0.5
    x, y = g[None, :], g[:, None]                                                  # (1, T), (T, 1)
    bank = np.empty((M, T, T), dtype=np.float32)
    for m in range(M):
        tex = np.zeros((T, T))
        for w in range(3):
            along = np.cos(wave_angle[m, w]) * x + np.sin(wave_angle[m, w]) * y
            tex += wave_amp[m, w] * np.cos(2 * np.pi * along / wave_period[m, w] + wave_phase[m, w])
        for b in range(4):
            d2 = (x - blob_x[m, b]) ** 2 + (y - blob_y[m, b]) ** 2
            tex += blob_amp[m, b] * np.exp(-d2 / (2 * blob_sigma[m, b] ** 2))
        bank[m] = (tex - tex.mean()) / (tex.std() + 1e-6)
    return bank


# ---------------------------------------------------------------- shapes

# Signed distances (negative inside) of shapes of radius about 1 in object coordinates (u right,
# v down). Exact or a close bound near the edge, which is all antialiasing needs.

def _box(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.maximum(np.abs(u) - np.float32(a), np.abs(v) - np.float32(b))


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v) - np.float32(0.85)


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _box(u, v, 0.72, 0.72)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral, circumradius 1.1, apex up."""
    h = np.float32(np.sqrt(3) / 2)
    side = h * np.abs(u) - np.float32(0.5) * v
    return np.maximum(v, side) - np.float32(0.55)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.minimum(_box(u, v, 0.95, 0.3), _box(u, v, 0.3, 0.95))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(np.sqrt(u * u + v * v) - np.float32(0.68)) - np.float32(0.27)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five points, outer radius 1, inner 0.4 (I. Quilez's folded star distance)."""
    k1x, k1y = np.float32(0.809016994375), np.float32(-0.587785252292)
    x, y = np.abs(u), -v  # point up
    d = np.maximum(k1x * x + k1y * y, 0.0) * 2
    x, y = x - d * k1x, y - d * k1y
    d = np.maximum(-k1x * x + k1y * y, 0.0) * 2
    x, y = np.abs(x + d * k1x), y - d * k1y - np.float32(1)
    bax, bay = np.float32(0.4) * -k1y, np.float32(0.4) * k1x - np.float32(1)
    h = np.clip((x * bax + y * bay) / np.float32(bax * bax + bay * bay), 0.0, 1.0)
    ex, ey = x - h * bax, y - h * bay
    return np.sqrt(ex * ex + ey * ey) * np.sign(y * bax - x * bay)


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rhombus, half-width 0.55, half-height 1."""
    a, b = 0.55, 1.0
    norm = np.float32(np.hypot(a, b))
    return (np.abs(u) * np.float32(b) + np.abs(v) * np.float32(a)) / norm - np.float32(a * b / np.hypot(a, b))


def _bar(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _box(u, v, 1.0, 0.28)


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    bite = np.float32(0.75) - np.sqrt((u - np.float32(0.45)) ** 2 + v * v)
    return np.maximum(np.sqrt(u * u + v * v) - np.float32(0.9), bite)


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Points right: a shaft from -0.85 to 0.25 and a head from 0.05 to the tip at 0.95."""
    shaft = _box(u + np.float32(0.3), v, 0.55, 0.17)
    norm = np.float32(np.hypot(0.55, 0.9))
    sides = (np.float32(0.55) * (u - np.float32(0.95)) + np.float32(0.9) * np.abs(v)) / norm
    head = np.maximum(np.float32(0.05) - u, sides)
    return np.minimum(shaft, head)


_SDF = {
    "circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross, "ring": _ring,
    "star": _star, "diamond": _diamond, "bar": _bar, "crescent": _crescent, "arrow": _arrow,
}
assert tuple(_SDF) == SHAPES
