import numpy as np
import pytest
import torch

from mlml.data.dataset import EpochSampler
from mlml.data.pipeline import build_data, default_splits
from tests.conftest import tiny_config


def test_sampler_shards_cover_everything_and_resume_skips():
    full = EpochSampler(10, shuffle=True, seed=1, with_epoch=False)
    full.set_epoch(3)
    order = list(full)
    shards = [EpochSampler(10, True, 1, rank=r, world_size=3, with_epoch=False) for r in range(3)]
    for s in shards:
        s.set_epoch(3)
    got = [k for s in shards for k in s]
    assert sorted(set(got)) == list(range(10)) and len(got) == 12          # padded to 3 x 4
    assert [k for s in shards for k in s][:4] == order[0:12:3]
    full.set_epoch(3, skip=4)
    assert list(full) == order[4:]
    full.set_epoch(4)
    assert list(full) != order


def test_splits_are_disjoint():
    s = default_splits(100, {"train": 60, "val": 20, "test": 20}, seed=0)
    allrows = np.concatenate(list(s.values()))
    assert len(set(allrows.tolist())) == 100


def test_batches_follow_the_contract():
    cfg = tiny_config()
    data = build_data(cfg.data)
    loader = data.loader("train", {"image": "flip_crop"}, seed=0)
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    B, C = 32, data.label_space.num_labels
    assert batch["image"].shape == (B, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["targets"].shape == (B, C) and batch["targets"].dtype == torch.float32
    assert batch["observed"].dtype == torch.bool and batch["index"].dtype == torch.long
    assert batch["domain"].shape == (B,)
    assert torch.equal(batch["observed"].sum(1), torch.ones(B, dtype=torch.long))   # single positive
    # The same epoch gives the same augmented batch again.
    again = next(iter(loader))
    assert torch.equal(again["image"], batch["image"])
    test = next(iter(data.loader("test", {"image": "none"}, seed=0)))
    assert bool(test["observed"].all()) and torch.equal(test["targets"], data.hidden_labels("test", test["index"].numpy()).float())
    assert "full_targets" not in batch and "full_targets" not in test      # the answer key never rides in a batch


@pytest.mark.parametrize("name", ["flip_crop", "crop"])
def test_flip_crop_equals_numpy_reflect_pad_then_crop(name):
    """`flip_crop` and `crop` (its shift alone, never mirrored) against numpy's reflect padding."""
    import random

    from mlml.data.transforms import TRANSFORMS

    tf, pad, flips = TRANSFORMS.get(name)(16), 2, 0
    for h, w in ((16, 16), (12, 20), (16, 16)):          # other shapes through the same transform: its index cache
        image = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
        for seed in range(40):
            r = random.Random(seed)
            dy, dx, flip = r.randint(-pad, pad), r.randint(-pad, pad), r.random() < 0.5 and name == "flip_crop"
            padded = np.pad(image.numpy(), ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
            ref = padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w]
            if flip:
                ref, flips = ref[:, :, ::-1], flips + 1
            assert np.array_equal(tf(image, seed).numpy(), ref)
    assert (flips > 0) == (name == "flip_crop")
