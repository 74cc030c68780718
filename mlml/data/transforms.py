"""Named augmentations of uint8 (3, H, W) images; a method asks for views by these names.

A transform is `fn(image, seed) -> image`: its randomness comes only from `seed` (derived from
(run seed, epoch, index, view)), so views are reproducible with any number of workers and after a
resume. `none` leaves the image as it is (evaluation). `flip_crop` is the weak view: a horizontal
flip and a random shift of up to 1/8 of the side with reflected borders, which move and mirror
objects but change neither their shape class nor their colour. `crop` is the shift alone, for
classes a mirror would change (digits: the real-image track, `mlml.data.mnist`).

`strong` is the student's view for teacher-student methods: the weak view, then a small rotation
and scale, brightness and contrast, pixel noise and one cutout (torchvision transforms v2
functional ops with parameters drawn from the seed). It is chosen so as not to change labels:
colour labels live in hue and saturation, so nothing touches hue (no hue jitter, solarize, invert,
posterize, equalize or greyscale) and contrast only blends towards the image's own grey; shape
labels must survive, so rotation stays within +-10 degrees (a square turned by 45 degrees would be
a diamond) with no shear, and the cutout side is a quarter of the image, smaller than an object.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from mlml.registry import Registry

Transform = Callable[[torch.Tensor, int], torch.Tensor]
TRANSFORMS: Registry = Registry("transform")


@TRANSFORMS.register("none")
def none(size: int) -> Transform:
    return lambda image, seed: image


def reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect indices into [0, n) without repeating the edge (numpy's 'reflect' padding)."""
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


@TRANSFORMS.register("flip_crop")
def flip_crop(size: int) -> Transform:
    return shift(size, flips=True)


@TRANSFORMS.register("crop")
def crop(size: int) -> Transform:
    """`flip_crop` without the flip: for data whose classes are not mirror-symmetric (digits)."""
    return shift(size, flips=False)


def shift(size: int, flips: bool) -> Transform:
    """A random shift of up to 1/8 of the side with reflected borders, and (`flips`) a horizontal flip."""
    pad = max(1, size // 8)
    # Source rows (times the width) and columns of each shift, built once: a per-item gather is then
    # one numpy take (the loader runs this per image, in the training process when num_workers = 0;
    # np.take on a small uint8 image costs about half of torch's index_select).
    rows: dict[tuple[int, int, int], np.ndarray] = {}       # (h, w, dy) -> (h, 1) row offsets
    cols: dict[tuple[int, int, bool], np.ndarray] = {}      # (w, dx, flip) -> (1, w) columns

    def apply(image: torch.Tensor, seed: int) -> torch.Tensor:
        r = random.Random(seed)
        dy, dx, flip = r.randint(-pad, pad), r.randint(-pad, pad), r.random() < 0.5 and flips
        c, h, w = image.shape
        ys = rows.get((h, w, dy))
        if ys is None:
            ys = rows[(h, w, dy)] = (reflect(torch.arange(h) + dy, h) * w)[:, None].numpy()
        xs = cols.get((w, dx, flip))
        if xs is None:
            xs = reflect(torch.arange(w) + dx, w)
            xs = cols[(w, dx, flip)] = (xs.flip(0) if flip else xs)[None, :].numpy()
        flat = np.take(image.numpy().reshape(c, h * w), (ys + xs).reshape(-1), axis=1)       # (3, H * W)
        return torch.from_numpy(flat.reshape(c, h, w))                                       # (3, H, W)

    return apply


@TRANSFORMS.register("strong")
def strong(size: int) -> Transform:
    weak = flip_crop(size)
    cut = max(1, size // 4)

    def apply(image: torch.Tensor, seed: int) -> torch.Tensor:
        r = random.Random(seed ^ 0x5EED)
        x = weak(image, seed)
        x = TF.affine(x, angle=r.uniform(-10.0, 10.0), translate=[0, 0], scale=r.uniform(0.9, 1.1), shear=[0.0, 0.0],
                      interpolation=TF.InterpolationMode.BILINEAR)
        x = TF.adjust_brightness(x, r.uniform(0.7, 1.3))
        x = TF.adjust_contrast(x, r.uniform(0.7, 1.3))
        g = torch.Generator().manual_seed(seed & 0x7FFF_FFFF)
        noise = torch.randn(x.shape, generator=g) * (0.03 * 255.0)
        x = (x.float() + noise).clamp_(0, 255).to(torch.uint8)
        if r.random() < 0.5:
            i, j = r.randint(0, size - cut), r.randint(0, size - cut)
            x = TF.erase(x, i, j, cut, cut, torch.tensor(127, dtype=torch.uint8))
        return x

    return apply


def build_views(views: dict[str, str], size: int) -> dict[str, Transform]:
    """{"image": "flip_crop", ...} -> {"image": transform, ...}."""
    return {name: TRANSFORMS.get(kind)(size) for name, kind in views.items()}
