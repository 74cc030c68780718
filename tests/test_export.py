import json

import numpy as np
import pytest

from mlml.cli import main
from mlml.data.annotations import AnnotationSource
from mlml.data.synthetic import SyntheticConfig, SyntheticSource
from tests.conftest import TINY

N = 160


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(out), "--n", str(N), *sets("data.synthetic.image_size=16")]) == 0
    return out


def test_export_holds_the_synthetic_images_and_labels(exported, tmp_path):
    source = SyntheticSource(SyntheticConfig(image_size=16), N, 0)
    files = AnnotationSource(exported / "annotations.jsonl", exported / "labels.json", None, 16, store=tmp_path / "s")
    assert files.label_space == source.label_space and len(files) == N
    assert np.array_equal(files.labels.dense(np.arange(N)).numpy(), source.labels.dense(np.arange(N)).numpy())
    for i in (0, 57, N - 1):
        assert np.array_equal(files.image(i).numpy(), source.images(np.array([i]))[0].numpy())   # lossless PNG
        assert files.paths[i] == f"images/{source.objects(i)[0].shape}/{i:06d}.png"          # ImageNet-style too


def test_export_images_folder_is_an_imagenet_style_folder(exported, tmp_path):
    from mlml.data.folder import ImageFolderSource

    source = SyntheticSource(SyntheticConfig(image_size=16), N, 0)
    folder = ImageFolderSource(exported / "images", 16, store=tmp_path / "s")
    names = folder.label_space.names
    for k in range(0, N, 17):
        i = int(folder.paths[k].split("/")[1][:6])
        assert names[int(folder.labels.row(k)[0])] == source.objects(i)[0].shape


def train_args(exported, out, *extra):
    return ["train", *sets(*TINY, "data.source=annotations", f"data.annotations.file={exported / 'annotations.jsonl'}",
                       f"data.annotations.label_names={exported / 'labels.json'}", "data.annotations.image_size=16", f"data.store={out}-store",
                       "data.n_train=96", "data.n_val=32", "data.n_test=32", "data.batch_size=16", "optim.epochs=1", *extra),
            "--out", str(out)]


def test_train_one_epoch_on_the_export_end_to_end(exported, tmp_path):
    assert main(train_args(exported, tmp_path / "run")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data/skipped_images"] == 0 and 0 < metrics["metrics"]["test/mAP_macro"] <= 1


def test_corrupt_images_counted_in_the_run_or_stop_it_with_strict(exported, tmp_path, capsys):
    broken = exported.parent / "broken"
    broken.mkdir()
    for f in exported.rglob("*"):
        if f.is_file():
            (broken / f.relative_to(exported)).parent.mkdir(parents=True, exist_ok=True)
            (broken / f.relative_to(exported)).write_bytes(f.read_bytes())
    lines = (broken / "annotations.jsonl").read_text().splitlines()
    bad = [json.loads(lines[i])["path"] for i in range(0, N, 10)]                    # 16 unreadable images
    for path in bad:
        (broken / path).write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="skipped: cannot read image"):
        assert main(train_args(broken, tmp_path / "run")) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    by_split = metrics["data/skipped_images_by_split"]
    assert metrics["data/skipped_images"] == sum(by_split.values()) > 0 and by_split["train"] > 0
    capsys.readouterr()
    assert main([*train_args(broken, tmp_path / "strict"), "--strict"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_a_bad_annotation_line_stops_before_training(exported, tmp_path, capsys):
    bad = tmp_path / "annotations.jsonl"
    lines = (exported / "annotations.jsonl").read_text().splitlines()
    lines[41] = '{"path": "images/x.png", "positives": ["red", "unicorn"]}'
    bad.write_text("\n".join(lines) + "\n")
    args = train_args(exported, tmp_path / "run")
    args[args.index(f"data.annotations.file={exported / 'annotations.jsonl'}")] = f"data.annotations.file={bad}"
    capsys.readouterr()
    assert main(args) == 2
    assert f"{bad}:42: unknown label 'unicorn'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main([*args[:-2], "--set", "data.annotations.file=", "--out", str(tmp_path / "r2")]) == 2
    assert "config key 'data.annotations.file' must be an annotation file" in capsys.readouterr().err


def test_data_index_prints_a_summary(exported, tmp_path, capsys):
    capsys.readouterr()
    assert main(["data", "index", *sets("data.source=annotations", f"data.annotations.file={exported / 'annotations.jsonl'}",
                                        f"data.annotations.label_names={exported / 'labels.json'}", f"data.store={tmp_path / 's'}")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == N and summary["groups"] == {"colour": 6, "object": 8} and summary["known_negatives"] == 0
    assert summary["positives"] == int(SyntheticSource(SyntheticConfig(image_size=16), N, 0).labels.indptr[-1])
