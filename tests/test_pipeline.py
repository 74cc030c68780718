"""Splits: a source's own (split column, one file per split, a split file), capped; the split hash."""

import json

import numpy as np
import pytest

from mlml.cli import main
from mlml.config import ConfigError
from mlml.data.annotations import AnnotationError
from mlml.data.pipeline import build_data, capped_splits, default_splits, split_hash
from tests.conftest import tiny_config

N = 96
SPLIT_OF = {0: "train", 1: "train", 2: "val", 3: "test"}   # image i goes to SPLIT_OF[i % 4]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Synthetic 16 px images as files, and annotation files with a fixed split (a column, and one file per split)."""
    out = tmp_path_factory.mktemp("splits")
    assert main(["data", "synth", "--out", str(out), "--n", str(N), "--set", "data.synthetic.image_size=16"]) == 0
    lines = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    with open(out / "split.jsonl", "w") as f:
        for i, item in enumerate(lines):
            f.write(json.dumps({**item, "split": SPLIT_OF[i % 4]}) + "\n")
    for split in ("train", "val", "test"):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(item) + "\n" for i, item in enumerate(lines) if SPLIT_OF[i % 4] == split))
    return out


def files_config(out, tmp_path, annotations, *extra):
    return tiny_config("data.source=annotations", f"data.annotations.file={annotations}", f"data.annotations.label_names={out / 'labels.json'}",
                       "data.annotations.image_size=16", f"data.annotations.root={out}", f"data.store={tmp_path / 'store'}", "data.n_train=-1", "data.n_val=-1", "data.n_test=-1", *extra)


def paths_of(data, split):
    return {data.source.paths[int(r)] for r in data.splits[split]}


def test_split_column_and_split_files_give_the_same_splits(exported, tmp_path):
    column = build_data(files_config(exported, tmp_path / "a", str(exported / "split.jsonl")).data)
    per_file = {s: str(exported / f"{s}.jsonl") for s in ("train", "val", "test")}
    table = "{" + ", ".join(f'{s} = "{f}"' for s, f in per_file.items()) + "}"
    files = build_data(files_config(exported, tmp_path / "b", table).data)
    assert [len(column.splits[s]) for s in ("train", "val", "test")] == [N // 2, N // 4, N // 4]
    for s in ("train", "val", "test"):
        assert paths_of(column, s) == paths_of(files, s) == {
            column.source.paths[i] for i in range(N) if SPLIT_OF[int(column.source.paths[i][-10:-4]) % 4] == s}
    assert split_hash(column.splits) == split_hash(column.splits) != split_hash({**column.splits, "test": column.splits["test"][1:]})


def test_split_file_and_caps(exported, tmp_path):
    rows = [json.loads(line) for line in (exported / "annotations.jsonl").read_text().splitlines()]
    split_file = tmp_path / "splits.csv"
    split_file.write_text("path,split\n" + "".join(f"{r['path']},{'test' if i < 10 else 'train'}\n" for i, r in enumerate(rows[:40])))
    cfg = files_config(exported, tmp_path, str(exported / "annotations.jsonl"), f"data.split_file={split_file}", "data.n_val=5")
    data = build_data(cfg.data)
    assert len(data.splits["test"]) == 10 and len(data.splits["val"]) == 5 and len(data.splits["train"]) == 25   # val from train
    assert paths_of(data, "test") == {r["path"] for r in rows[:10]}
    with pytest.warns(UserWarning, match="data.n_train = 20 caps the source's train split of 30"):
        capped = capped_splits({"train": np.arange(30), "test": np.arange(30, 40)}, {"train": 20, "val": 0, "test": -1}, 0)
    assert len(capped["train"]) == 20 and len(capped["test"]) == 10 and set(capped["train"]) <= set(range(30))
    split_file.write_text("path,split\nimages/nowhere.png,test\n")
    with pytest.raises(AnnotationError, match="splits.csv:2: 'images/nowhere.png' is not an image of the source"):
        build_data(cfg.data)
    with pytest.raises(ConfigError, match="needs a source with splits of its own"):
        build_data(tiny_config("data.n_train=-1").data)


def test_split_column_on_some_lines_only_is_an_error(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    (tmp_path / "a.csv").write_text("path,positives,split\n1.png,cat,train\n2.png,dog,\n")
    cfg = tiny_config("data.source=annotations", f"data.annotations.file={tmp_path / 'a.csv'}", f"data.annotations.label_names={tmp_path / 'labels.txt'}",
                      f"data.store={tmp_path / 's'}")
    with pytest.raises(AnnotationError, match=r"a.csv:3: no split, but .*a.csv:2 has one"):
        build_data(cfg.data)
    (tmp_path / "a.csv").write_text("path,positives,split\n1.png,cat,training\n")
    with pytest.raises(AnnotationError, match="a.csv:2: split 'training' is not one of train, val, test"):
        build_data(cfg.data)


def test_training_on_a_fixed_split_never_sees_a_test_image(exported, tmp_path, monkeypatch):
    from mlml.trainer import Trainer, train

    seen: set[str] = set()
    original = Trainer.train_step

    def record(self, batch):
        rows = self.train_loader.dataset.rows[batch["index"].numpy()]
        seen.update(self.data.source.paths[int(r)] for r in rows)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", record)
    cfg = files_config(exported, tmp_path, str(exported / "split.jsonl"), "data.batch_size=16")
    result = train(cfg, tmp_path / "run")
    data = build_data(cfg.data)
    assert seen == paths_of(data, "train")                                    # every training image, and only those
    assert not seen & paths_of(data, "test") and not seen & paths_of(data, "val")
    assert result["split_hash"] == split_hash(data.splits)


def test_eval_labels_follow_the_source_and_annotated_evaluation_masks(exported, tmp_path):
    """A source listing negatives is evaluated on its annotated entries; the run reports rare classes apart."""
    import torch

    from mlml.trainer import train

    lines = [json.loads(line) for line in (exported / "split.jsonl").read_text().splitlines()]
    names = [n for g in json.loads((exported / "labels.json").read_text())["groups"] for n in g["labels"]]
    with open(tmp_path / "partial.jsonl", "w") as f:            # every other unlisted label a known negative
        for i, item in enumerate(lines):
            negatives = [n for k, n in enumerate(names) if n not in item["positives"] and (k + i) % 2]
            f.write(json.dumps({**item, "negatives": negatives}) + "\n")
    partial = files_config(exported, tmp_path / "p", str(tmp_path / "partial.jsonl"), "eval.min_positives=3")
    data = build_data(partial.data)
    assert data.eval_labels == "annotated" and data.annotated("test") and not data.annotated("train")
    batch = next(iter(data.loader("test", {"image": "none"}, seed=0)))
    rows = data.splits["test"][batch["index"].numpy()]
    assert torch.equal(batch["observed"], data.labels.dense(rows) | data.labels.dense_negatives(rows))
    assert build_data(files_config(exported, tmp_path / "c", str(exported / "split.jsonl")).data).eval_labels == "complete"
    complete = files_config(exported, tmp_path / "p", str(tmp_path / "partial.jsonl"), "data.eval_labels=complete")
    assert build_data(complete.data).eval_labels == "complete"
    with pytest.raises(ConfigError, match="needs a source that lists negatives"):
        build_data(files_config(exported, tmp_path / "c", str(exported / "split.jsonl"), "data.eval_labels=annotated").data)
    result = train(partial, tmp_path / "run")
    m = result["metrics"]
    assert result["eval_labels"] == "annotated"
    assert m["test/classes_evaluated"] + m["test/classes_few_positives"] == len(names)
    assert len(result["classes_few_positives"]) == m["test/classes_few_positives"] and 0 <= m["test/mAP_macro"] <= 1
    assert "test/group_acc/colour" not in m                      # group metrics need complete labels


def test_an_image_in_two_split_files_is_refused(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    (tmp_path / "train.csv").write_text("path,positives\n1.png,cat\n2.png,dog\n")
    (tmp_path / "test.csv").write_text("path,positives\n3.png,cat\n./2.png,dog\n")
    files = f'{{train = "{tmp_path / "train.csv"}", test = "{tmp_path / "test.csv"}"}}'
    cfg = tiny_config("data.source=annotations", f"data.annotations.file={files}", f"data.annotations.label_names={tmp_path / 'labels.txt'}",
                      f"data.store={tmp_path / 's'}")
    with pytest.raises(AnnotationError, match=r"test.csv:3: image './2.png' is listed twice, first on line 3 of .*train.csv"):
        build_data(cfg.data)


def test_split_hash_is_stable_and_changes_with_any_index_or_name():
    splits = default_splits(100, {"train": 60, "val": 20, "test": 20}, seed=0)
    assert split_hash(splits) == split_hash({k: v.copy() for k, v in reversed(list(splits.items()))})
    assert split_hash(splits) == split_hash(default_splits(100, {"train": 60, "val": 20, "test": 20}, seed=0))
    assert split_hash(splits) != split_hash(default_splits(100, {"train": 60, "val": 20, "test": 20}, seed=1))
    moved = dict(splits, val=np.sort(np.append(splits["val"][1:], splits["train"][0])))
    assert split_hash(splits) != split_hash(moved)
    assert split_hash(splits) != split_hash({"train": splits["val"], "val": splits["train"], "test": splits["test"]})
    assert len(split_hash(splits)) == 16


def test_loader_workers_leave_stop_signals_to_the_trainer():
    """SLURM signals the whole process group: workers must not die before the trainer saves."""
    import subprocess
    import sys

    from mlml.data.pipeline import ignore_stop_signals

    data = build_data(tiny_config("data.num_workers=1").data)
    assert data.loader("train", {"image": "none"}, seed=0).worker_init_fn is ignore_stop_signals
    code = ("import os, signal; from mlml.data.pipeline import ignore_stop_signals; ignore_stop_signals(0); "
            "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGUSR1); print('alive')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "alive", out.stderr
