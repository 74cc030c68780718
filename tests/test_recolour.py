import numpy as np
import pytest
import torch

from mlml.data.label_store import LabelStore
from mlml.data.recolour import HUES, RecolourSource, dominant_hue, nearest_colour, recolour
from mlml.data.synthetic import SyntheticConfig, SyntheticSource
from mlml.labels import Group, LabelSpace


def photo_like(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, S, S): smooth random colours and shading, dark and light areas (like photos)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g) * torch.rand(n, 1, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(small, size=size, mode="bilinear") * 255).to(torch.uint8)


class PhotoSource:
    """A stand-in for an image folder: photo-like images, one object class each."""

    def __init__(self, n: int) -> None:
        self.images_ = photo_like(n)
        self.label_space = LabelSpace(("cat", "red"), (Group("object", (0, 1), exclusive=True),))   # 'red' collides
        self.labels = LabelStore.from_lists([[i % 2] for i in range(n)], 2, negatives=[[1 - i % 2] if i % 3 == 0 else [] for i in range(n)])

    def __len__(self) -> int:
        return len(self.images_)

    def image(self, i: int) -> torch.Tensor:
        return self.images_[i]


@pytest.mark.parametrize("colour", range(len(HUES)))
def test_dominant_colour_of_the_result_is_the_assigned_class(colour):
    images = torch.cat([photo_like(12, seed=colour), SyntheticSource(SyntheticConfig(image_size=24), 12, colour).images(np.arange(12))])
    hue = list(HUES.values())[colour]
    for k, image in enumerate(images):
        out = recolour(image, hue + (k % 13) - 6)                      # the source jitters hues by up to ±6°
        assert out.shape == image.shape and out.dtype == torch.uint8
        assert nearest_colour(dominant_hue(out), len(HUES)) == colour


def test_recolour_keeps_luminance_order():
    image = photo_like(1)[0]
    out = recolour(image, 120.0).float()
    grey, tinted = image.float().amax(0).flatten(), out.amax(0).flatten()
    assert torch.corrcoef(torch.stack([grey, tinted]))[0, 1] > 0.99


def test_recolour_source_labels_and_images():
    inner = PhotoSource(60)
    source = RecolourSource(inner, colours=6, seed=3)
    space = source.label_space
    assert space.names[:6] == tuple(f"colour:{n}" for n in list(HUES)[:6])        # prefixed: the folder has 'red'
    assert [g.name for g in space.groups] == ["colour", "object"] and space.group("object").labels == (6, 7)
    dense, neg = source.labels.dense(np.arange(60)), source.labels.dense_negatives(np.arange(60))
    assert torch.equal(dense[:, 6:], inner.labels.dense(np.arange(60))) and torch.equal(neg[:, 6:], inner.labels.dense_negatives(np.arange(60)))
    assert torch.equal(dense[:, :6].sum(1), torch.ones(60, dtype=torch.long)) and not neg[:, :6].any()
    colours = dense[:, :6].float().argmax(1)
    assert len(set(colours.tolist())) == 6                                          # every class is used
    for i in range(0, 60, 7):
        assert nearest_colour(dominant_hue(source.image(i)), 6) == int(colours[i])
    again = RecolourSource(PhotoSource(60), colours=6, seed=3)
    assert torch.equal(again.image(5), source.image(5))                             # deterministic per index
    assert not np.array_equal(RecolourSource(inner, 6, seed=4).colour, source.colour)
