"""Inference from the checkpoint alone: predict in an empty directory equals eval; unreadable images are skipped."""

import csv
import json
import shutil

import pytest
import torch

from mlml.checkpoint import CheckpointError, load_checkpoint
from mlml.cli import main
from mlml.inference import load_predictor
from tests.conftest import TINY

N = 96


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run on exported 16 px synthetic files with a fixed split (every 4th image a test image)."""
    out = tmp_path_factory.mktemp("inference")
    assert main(["data", "synth", "--out", str(out / "data"), "--n", str(N), *sets("data.synthetic.image_size=16")]) == 0
    lines = [json.loads(line) for line in (out / "data" / "annotations.jsonl").read_text().splitlines()]
    split = ["train", "train", "val", "test"]
    (out / "data" / "split.jsonl").write_text("".join(json.dumps({**r, "split": split[i % 4]}) + "\n" for i, r in enumerate(lines)))
    config = [*TINY, "data.source=annotations", f"data.annotations.file={out / 'data' / 'split.jsonl'}", f"data.annotations.root={out / 'data'}",
              f"data.annotations.label_names={out / 'data' / 'labels.json'}", "data.annotations.image_size=16", f"data.store={out / 'store'}",
              "data.n_train=-1", "data.n_val=-1", "data.n_test=-1", "data.batch_size=16"]
    assert main(["train", *sets(*config), "--out", str(out / "run")]) == 0
    test_images = [out / "data" / r["path"] for i, r in enumerate(lines) if i % 4 == 3]
    return out, test_images


def labels_by_image(path):
    return {str(json.loads(line)["image"]): json.loads(line)["labels"] for line in path.read_text().splitlines()}


def test_predict_from_a_copied_checkpoint_equals_eval(run, tmp_path, monkeypatch, capsys):
    out, test_images = run
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    shutil.copy(out / "run" / "checkpoints" / "best.pt", empty / "best.pt")
    ckpt = load_checkpoint(empty / "best.pt")                                     # weights_only=True
    thresholds = ckpt["inference"]["thresholds"]
    assert thresholds.shape == (ckpt["model"]["head.fc.weight"].shape[0],) and ckpt["inference"]["image_size"] == 16
    monkeypatch.chdir(empty)

    def no_data(*args, **kwargs):
        raise AssertionError("predict built the training data")

    with monkeypatch.context() as m:
        m.setattr("mlml.data.pipeline.build_data", no_data)
        m.setattr("mlml.data.pipeline.SOURCES.get", no_data)
        assert main(["predict", "--checkpoint", "best.pt", *map(str, test_images), "--out", "predictions.jsonl", "--device", "cpu"]) == 0
    assert "wrote 24 predictions" in capsys.readouterr().out
    predicted = labels_by_image(empty / "predictions.jsonl")
    assert main(["eval", "--checkpoint", "best.pt", "--predictions", "eval.jsonl"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "run" / "metrics.json").read_text())["metrics"]
    assert printed["test/f1_macro_calibrated"] == pytest.approx(saved["test/f1_macro_calibrated"], abs=1e-6)
    evaluated = labels_by_image(empty / "eval.jsonl")
    assert len(predicted) == len(evaluated) == N // 4 and predicted == evaluated
    assert any(predicted.values())                                                 # some labels pass their thresholds


def test_predict_a_folder_with_an_unreadable_image_to_csv(run, tmp_path, capsys):
    out, test_images = run
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in test_images[:3]:
        shutil.copy(image, folder / image.name)
    (folder / "broken.png").write_bytes(b"not an image")
    best = out / "run" / "checkpoints" / "best.pt"
    assert main(["predict", "--checkpoint", str(best), str(folder), "--out", str(tmp_path / "p.csv"), "--batch-size", "2"]) == 0
    assert "broken.png" in capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["image"].split("/")[-1] for r in rows] == sorted(["broken.png", *(i.name for i in test_images[:3])])
    assert [bool(r["error"]) for r in rows] == [r["image"].endswith("broken.png") for r in rows]
    predictor = load_predictor(best)
    assert list(rows[0]) == ["image", "labels", "error", *(g.name for g in predictor.label_space.groups if g.exclusive)]
    assert predictor.calibrated and predictor.image_size == 16
    image = torch.stack([torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8)] * 2)
    assert predictor.probabilities(image).shape == (2, predictor.label_space.num_labels)


class Payload:
    """A pickled object of a class: what a checkpoint must not hold (loading it could run code)."""


def test_an_unsafe_or_missing_checkpoint_is_refused_by_name(tmp_path, capsys):
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "none.pt"), str(tmp_path)]) == 2
    assert "none.pt" in capsys.readouterr().err
