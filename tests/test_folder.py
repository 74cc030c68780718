import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from mlml.data.folder import ImageFolderSource
from mlml.data.image_files import UnreadableImageError, decode_image
from mlml.data.pipeline import build_data
from tests.conftest import tiny_config

CLASSES = ("cat", "dog", "fish")


def make_folder(root, per_class: int = 6, corrupt: int = 0, size: int = 20):
    """root/<class>/<k>.png photos (and a few unreadable files among the first class's images)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 255, (size, size + 4 * c, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k:03d}.png")
    for k in range(corrupt):
        path = root / "cat" / f"{k:03d}.png"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if k % 2 else b"not an image")   # truncated / garbage
    (root / "dog" / "notes.txt").write_text("not an image")                        # ignored: no image suffix
    (root / ".hidden").mkdir()                                                      # ignored: hidden
    return root


def test_decode_image_centre_square_rgb(tmp_path):
    pixels = np.zeros((10, 30), dtype=np.uint8)
    pixels[:, 10:20] = 255                                                         # the centre square is white
    Image.fromarray(pixels, mode="L").save(tmp_path / "grey.png")
    image = decode_image(tmp_path / "grey.png", 8)
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and int(image.min()) > 200
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        decode_image(tmp_path / "bad.jpg", 8)
    with pytest.raises(UnreadableImageError, match="missing.png"):
        decode_image(tmp_path / "missing.png", 8)


def test_folder_classes_are_the_single_positive(tmp_path):
    root = make_folder(tmp_path / "photos")
    source = ImageFolderSource(root, 16, store=tmp_path / "store")
    assert source.label_space.names == CLASSES and source.label_space.groups[0].exclusive
    assert len(source) == 18 and source.paths[7] == "dog/001.png"
    assert source.labels.dense(np.arange(18)).sum(1).eq(1).all() and not source.labels.has_negatives
    assert [int(source.labels.row(i)[0]) for i in (0, 6, 17)] == [0, 1, 2]
    assert source.image(13).shape == (3, 16, 16)
    (root / "fish" / "new.png").write_bytes((root / "fish" / "000.png").read_bytes())
    assert len(ImageFolderSource(root, 16, store=tmp_path / "store")) == 19          # the index is rebuilt
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderSource(root / "cat", 16, store=tmp_path / "s2")


def folder_config(tmp_path, root, *extra):
    return tiny_config("data.source=folder", f"data.folder.root={root}", "data.folder.image_size=16", f"data.store={tmp_path / 'store'}",
                       "data.n_train=12", "data.n_val=3", "data.n_test=3", "data.batch_size=4", *extra)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_images_are_skipped_and_counted(tmp_path, workers):
    root = make_folder(tmp_path / "photos", corrupt=4)
    data = build_data(folder_config(tmp_path, root, f"data.num_workers={workers}").data)
    assert data.observation.__class__.__name__ == "Annotated"                       # the default for folders
    bad = {i for i in range(len(data.source)) if data.source.paths[i] in {f"cat/{k:03d}.png" for k in range(4)}}
    readable, skipped = [], 0
    # Workers warn in their own processes (stderr); in-process loading warns here.
    with pytest.warns(UserWarning, match="skipped: cannot read image") if workers == 0 else contextlib.nullcontext():
        for split in ("train", "val", "test"):
            for batch in data.loader(split, {"image": "none"}, seed=0):
                skipped += int(batch["skipped"])
                rows = data.splits[split][batch["index"].numpy()]
                readable += rows.tolist()
                assert batch["image"].shape[0] == len(rows) == batch["targets"].shape[0]
    assert skipped == len(bad) and set(readable).isdisjoint(bad) and len(readable) == 18 - len(bad)


def test_strict_stops_on_an_unreadable_image(tmp_path):
    root = make_folder(tmp_path / "photos", corrupt=6)                               # every cat image
    data = build_data(folder_config(tmp_path, root, "data.strict=true").data)
    with pytest.raises(UnreadableImageError, match="cannot read image"):
        for split in ("train", "val", "test"):
            list(data.loader(split, {"image": "none"}, seed=0))


def test_recolour_over_a_folder(tmp_path):
    from mlml.data.recolour import dominant_hue, nearest_colour

    root = make_folder(tmp_path / "photos")
    data = build_data(folder_config(tmp_path, root, "data.source=recolour", "data.recolour.colours=4").data)
    space = data.label_space
    assert space.names == ("red", "yellow", "green", "cyan", *CLASSES) and [g.name for g in space.groups] == ["colour", "object"]
    assert (tmp_path / "store" / "recolour-k4-seed0" / "meta.json").exists()         # cached beside the folder index
    batch = next(iter(data.loader("test", {"image": "none"}, seed=0)))
    full = data.hidden_labels("test", batch["index"].numpy()).float()
    assert torch.equal(full[:, :4].sum(1), torch.ones(len(full))) and torch.equal(full[:, 4:].sum(1), torch.ones(len(full)))
    for image, labels in zip(batch["image"], full):
        assert nearest_colour(dominant_hue(image), 4) == int(labels[:4].argmax())
    train = next(iter(data.loader("train", {"image": "flip_crop"}, seed=0)))
    assert torch.equal(train["observed"], train["targets"].bool())                  # annotated: positives only


def test_a_batch_of_unreadable_images_collates_empty(tmp_path):
    from mlml.data.dataset import Collate
    from mlml.data.label_store import LabelStore
    from mlml.data.observation import build_observation
    from mlml.labels import LabelSpace

    space = LabelSpace(CLASSES)
    store = LabelStore.from_lists([[0], [1], [2]], 3)
    collate = Collate(np.array([2, 0, 1]), store, build_observation("annotated", space, 0, {}, store))
    batch = collate([{"index": 0, "skipped": True}, {"index": 2, "skipped": True}])
    assert int(batch["skipped"]) == 2 and batch["index"].numel() == 0 and batch["targets"].shape == (0, 3)
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    batch = collate([{"index": 0, "skipped": True}, {"index": 2, "image": image}])
    assert int(batch["skipped"]) == 1 and batch["index"].tolist() == [2] and batch["image"].shape == (1, 3, 4, 4)
    assert batch["targets"].tolist() == [[0.0, 1.0, 0.0]]                          # row 1 of the source
