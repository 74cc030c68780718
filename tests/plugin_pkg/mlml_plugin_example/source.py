"""`quadrants`: images of four coloured quadrants; the labels are the colours present."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlml.config import DataConfig
from mlml.data.label_store import LabelStore
from mlml.labels import Group, LabelSpace
from mlml.settings import must

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40), "white": (245, 245, 245)}


@dataclass
class QuadrantsSettings:
    """`[data.quadrants]`: the source's own settings, checked when the config is loaded."""

    image_size: int = 32          # side of the square images, in pixels (even)
    grey: float = 0.4             # probability that a quadrant stays grey (one is always coloured)

    def __post_init__(self) -> None:
        must(self.image_size >= 8 and self.image_size % 2 == 0, "image_size", "an even number >= 8", self.image_size)
        must(0 <= self.grey < 1, "grey", "in [0, 1)", self.grey)


class Quadrants:
    """n images; each quadrant is grey or one of the colours, at least one quadrant coloured.

    Image i depends only on (settings, seed, i). Colour c appears in a quadrant with probability
    falling with c (label frequencies are skewed, as in real data).
    """

    def __init__(self, n: int, settings: QuadrantsSettings, seed: int) -> None:
        self.n, self.size, self.seed = n, settings.image_size, seed
        names = tuple(COLOURS)
        self.label_space = LabelSpace(names, (Group("colour", tuple(range(len(names)))),))
        self.palette = torch.tensor(list(COLOURS.values()), dtype=torch.uint8)       # (K, 3)
        rng = np.random.default_rng([seed, 0])
        p = np.array([0.5 ** k for k in range(len(names))])
        colour = rng.choice(len(names), size=(n, 4), p=p / p.sum())                  # (n, 4) colour per quadrant
        grey = rng.random((n, 4)) < settings.grey
        grey[np.arange(n), rng.integers(0, 4, n)] = False                            # at least one colour
        self.quadrant = np.where(grey, -1, colour)                                   # (n, 4), -1: grey
        dense = np.zeros((n, len(names)), dtype=bool)
        rows, cols = np.nonzero(self.quadrant >= 0)
        dense[rows, self.quadrant[rows, cols]] = True
        self.labels = LabelStore.from_dense(dense)

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> torch.Tensor:
        """uint8 (3, size, size)."""
        h = self.size // 2
        out = torch.full((3, self.size, self.size), 128, dtype=torch.uint8)
        for q, c in enumerate(self.quadrant[i].tolist()):
            if c >= 0:
                y, x = (q // 2) * h, (q % 2) * h
                out[:, y : y + h, x : x + h] = self.palette[c][:, None, None]
        noise = np.random.default_rng([self.seed, 1, i]).integers(-20, 21, out.shape)
        return (out.int() + torch.from_numpy(noise)).clamp(0, 255).to(torch.uint8)


def quadrants(data: DataConfig, settings: QuadrantsSettings) -> Quadrants:
    """Images of four coloured quadrants; the labels are the colours present."""
    return Quadrants(data.n_train + data.n_val + data.n_test, settings, data.data_seed)
