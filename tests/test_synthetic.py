"""The synthetic colour-plus-object source: determinism, batched rendering, labels, label space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlml.data.synthetic import PALETTE, SHAPES, SyntheticConfig, SyntheticSource
from mlml.settings import SettingError

CFG = SyntheticConfig(image_size=16)


@pytest.fixture(scope="module")
def source() -> SyntheticSource:
    return SyntheticSource(CFG, 64, seed=3)


def test_image_dtype_and_shape(source: SyntheticSource) -> None:
    img = source.image(0)
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    batch = source.images([5, 1, 7])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 16, 16)
    assert len(source) == 64


def test_deterministic_per_seed_and_index(source: SyntheticSource) -> None:
    """Image i depends on (seed, i) only: not on n, nor on the order or batch it is drawn in."""
    other = SyntheticSource(CFG, 200, seed=3)
    rows = [40, 3, 17, 3, 0]
    assert torch.equal(source.images(rows), other.images(rows[::-1]).flip(0))
    for i in rows:
        assert torch.equal(source.image(i), other.image(i))
        assert np.array_equal(source.labels.row(i), other.labels.row(i))
        assert source.objects(i) == other.objects(i)
    different = SyntheticSource(CFG, 64, seed=4)
    assert not torch.equal(source.images(range(8)), different.images(range(8)))


def test_images_equal_stacked_image(source: SyntheticSource) -> None:
    rows = np.arange(64)  # more than one render chunk at 16 px
    big = SyntheticSource(CFG, 64, seed=3)
    big_rows = big.images(rows)
    assert torch.equal(big_rows, torch.stack([source.image(int(i)) for i in rows]))
    assert torch.equal(source.images(torch.tensor([9, 2])), big_rows[[9, 2]])


def test_labels_are_union_of_objects(source: SyntheticSource) -> None:
    names = source.label_space.names
    for i in range(len(source)):
        objects = source.objects(i)
        assert CFG.min_objects <= len(objects) <= CFG.max_objects
        expected = {o.colour for o in objects} | {o.shape for o in objects}
        assert {names[j] for j in source.labels.row(i)} == expected


def test_every_image_has_a_colour_and_a_shape(source: SyntheticSource) -> None:
    dense = source.labels.dense(np.arange(len(source)))
    space = source.label_space
    assert dense[:, space.group_mask("colour")].any(1).all()
    assert dense[:, space.group_mask("object")].any(1).all()


def test_label_space_names_and_groups() -> None:
    space = SyntheticSource(SyntheticConfig(image_size=16, num_colours=4, num_shapes=5), 4, 0).label_space
    assert space.names == tuple(PALETTE)[:4] + SHAPES[:5]
    assert space.names[:2] == ("red", "blue") and space.names[4] == "circle"
    assert space.group("colour").labels == (0, 1, 2, 3)
    assert space.group("object").labels == (4, 5, 6, 7, 8)
    assert not space.group("colour").exclusive and not space.group("object").exclusive
    single = SyntheticSource(SyntheticConfig(image_size=16, max_objects=1), 4, 0).label_space
    assert single.group("colour").exclusive and single.group("object").exclusive


def test_frequency_skew_makes_some_labels_rare() -> None:
    skewed = SyntheticSource(SyntheticConfig(image_size=16, frequency_skew=1.5), 2000, 0)
    counts = skewed.labels.label_counts()
    for group in ("colour", "object"):
        c = counts[list(skewed.label_space.group(group).labels)]
        assert c[0] > 4 * c[-1] > 0  # the first class is the most frequent, the last rare
    uniform = SyntheticSource(SyntheticConfig(image_size=16, frequency_skew=0.0), 2000, 0)
    c = uniform.labels.label_counts()
    assert c.max() < 1.5 * c.min()


def test_objects_are_drawn() -> None:
    """The object's class colour shows at its centre (topmost object there, no noise)."""
    cfg = SyntheticConfig(image_size=32, noise=0.0, max_objects=1)
    src = SyntheticSource(cfg, 16, 0)
    imgs = src.images(range(16)).float() / 255
    for i in range(16):
        (o,) = src.objects(i)
        if o.shape in ("ring", "crescent", "arrow"):  # hollow or thin at the centre
            continue
        pixel = imgs[i, :, int(o.y), int(o.x)]
        assert torch.allclose(pixel, torch.tensor(o.rgb), atol=2 / 255), (o, pixel)


def test_config_rejects_out_of_range() -> None:
    with pytest.raises(SettingError, match="num_colours"):
        SyntheticConfig(num_colours=len(PALETTE) + 1)
    with pytest.raises(SettingError, match="min_objects"):
        SyntheticConfig(min_objects=3, max_objects=2)


def test_index_out_of_range(source: SyntheticSource) -> None:
    with pytest.raises(IndexError):
        source.image(64)


# ---------------------------------------------------------------- the conditional pattern group

def _digest(cfg: SyntheticConfig, n: int = 40, seed: int = 3) -> str:
    import hashlib

    s = SyntheticSource(cfg, n, seed)
    return hashlib.sha256(s.images(list(range(n))).numpy().tobytes() + s.labels.dense(np.arange(n)).numpy().tobytes()).hexdigest()[:16]


def test_default_images_and_labels_are_unchanged() -> None:
    """Published tables depend on the default data: patterns are opt-in and change nothing else."""
    assert _digest(SyntheticConfig(image_size=16)) == "b9effdf4f2700c68"
    assert _digest(SyntheticConfig(image_size=32, min_objects=1, max_objects=1)) == "3302714e6020e695"


def test_patterns_opt_in_group_and_labels() -> None:
    cfg = SyntheticConfig(image_size=16, min_objects=1, max_objects=1, num_patterns=3)
    src = SyntheticSource(cfg, 200, 0)
    space = src.label_space
    g = space.group("pattern")
    assert [space.names[i] for i in g.labels] == ["stripes", "dots", "checks"]
    assert g.exclusive and g.has_unknown and space.applies_to_names(g) == ("circle", "square")
    dense = src.labels.dense(np.arange(200))
    plain = SyntheticSource(SyntheticConfig(image_size=16, min_objects=1, max_objects=1), 200, 0)
    assert torch.equal(dense[:, : plain.label_space.num_labels], plain.labels.dense(np.arange(200)))
    for i in range(200):
        (obj,) = src.objects(i)
        has_pattern = dense[i, list(g.labels)]
        assert bool(has_pattern.any()) == (obj.shape in ("circle", "square"))
        if obj.pattern:
            assert [g.labels[k] for k in has_pattern.nonzero().flatten().tolist()] == [space.index(obj.pattern)]
    counts = dense[:, list(g.labels)].sum(0)
    assert (counts > 10).all()                                   # every pattern occurs


def test_patterns_change_only_patterned_objects() -> None:
    base = dict(image_size=16, min_objects=1, max_objects=1)
    src = SyntheticSource(SyntheticConfig(**base, num_patterns=3), 60, 0)
    plain = SyntheticSource(SyntheticConfig(**base), 60, 0)
    a, b = src.images(list(range(60))), plain.images(list(range(60)))
    assert torch.equal(a, torch.stack([src.image(i) for i in range(60)]))   # batched == one by one
    for i in range(60):
        same = torch.equal(a[i], b[i])
        assert same == (not src.objects(i)[0].pattern), i


def test_pattern_config_is_checked() -> None:
    with pytest.raises(SettingError, match="num_patterns"):
        SyntheticConfig(num_patterns=4)
    with pytest.raises(SettingError, match="pattern_shapes"):
        SyntheticConfig(num_shapes=3, pattern_shapes=["star"])
