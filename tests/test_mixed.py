"""The mixed source: several sources as one, each image's domain its source (synthetic vs real)."""

import json
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlml.cli import main
from mlml.config import ConfigError
from mlml.data.label_store import LabelStore
from mlml.data.mixed import MixedSource
from mlml.data.pipeline import build_data
from mlml.labels import LabelSpace
from mlml.distributed import DistInfo
from mlml.trainer import Trainer, train
from tests.conftest import tiny_config


class Fake:
    """A source of constant 4 px images (image i has value fill + i) with the given names and labels."""

    image_size = 4

    def __init__(self, names, dense, negatives=None, fill=0):
        self.label_space = LabelSpace(tuple(names))
        self.labels = LabelStore.from_dense(np.asarray(dense, dtype=bool), negatives)
        self.fill, self.n = fill, len(dense)

    def __len__(self):
        return self.n

    def image(self, i):
        return torch.full((3, 4, 4), self.fill + i, dtype=torch.uint8)


def random_labels(rng, n, c):
    return rng.random((n, c)) < 0.3


def test_labels_are_matched_by_name_and_concatenated():
    rng = np.random.default_rng(0)
    a, b = random_labels(rng, 7, 4), random_labels(rng, 5, 4)
    neg_b = ~b & (rng.random((5, 4)) < 0.5)
    order = [2, 0, 3, 1]                          # b's label j is a's label order[j]
    names = ["w", "x", "y", "z"]
    src = MixedSource([Fake(names, a), Fake([names[o] for o in order], b, neg_b, fill=100)], ["first", "second"])
    expected_b = np.zeros_like(b)
    expected_b[:, order] = b
    expected_neg = np.zeros_like(neg_b)
    expected_neg[:, order] = neg_b
    rows = np.arange(12)
    assert np.array_equal(src.labels.dense(rows).numpy(), np.concatenate([a, expected_b]))
    assert np.array_equal(src.labels.dense_negatives(rows).numpy(), np.concatenate([np.zeros_like(a), expected_neg]))
    assert src.domain(rows).tolist() == [0] * 7 + [1] * 5 and src.num_domains == 2
    assert int(src.image(3)[0, 0, 0]) == 3 and int(src.image(8)[0, 0, 0]) == 101    # member 1's image 1
    assert src.label_space.names == tuple(names)


def test_splits_take_evaluation_images_from_one_member_and_training_counts_per_member():
    rng = np.random.default_rng(1)
    src = MixedSource([Fake("ab", random_labels(rng, 50, 2)), Fake("ba", random_labels(rng, 30, 2))], ["s", "r"],
                      train_counts=[20, 5])
    splits = src.splits({"train": 25, "val": 10, "test": 15}, seed=3)
    assert set(src.domain(splits["val"])) == {1} and set(src.domain(splits["test"])) == {1}
    assert np.bincount(src.domain(splits["train"]), minlength=2).tolist() == [20, 5]
    everything = np.concatenate(list(splits.values()))
    assert len(np.unique(everything)) == len(everything) == 50
    with pytest.raises(ConfigError, match="mixed.train"):
        src.splits({"train": 24, "val": 10, "test": 15}, seed=3)
    with pytest.raises(ConfigError, match="mixed.eval"):
        MixedSource([Fake("ab", random_labels(rng, 50, 2)), Fake("ba", random_labels(rng, 30, 2))], ["s", "r"],
                    eval_member=0).splits({"train": 10, "val": 30, "test": 30}, seed=3)


def test_sources_with_other_label_names_or_image_sizes_are_errors_naming_them():
    rng = np.random.default_rng(2)
    with pytest.raises(ConfigError, match="source 'real' has other label names.*missing \\['b'\\].*extra \\['c'\\]"):
        MixedSource([Fake("ab", random_labels(rng, 5, 2)), Fake("ac", random_labels(rng, 5, 2))], ["syn", "real"])
    small = Fake("ab", random_labels(rng, 5, 2))
    small.image_size = 8
    with pytest.raises(ConfigError, match="sizes \\[4, 8\\]"):
        MixedSource([Fake("ab", random_labels(rng, 5, 2)), small], ["syn", "real"])


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The 'real' images: the synthetic generator with another seed, written as files."""
    out = tmp_path_factory.mktemp("real")
    assert main(["data", "synth", "--out", str(out), "--n", "200", "--set", "data.synthetic.image_size=16",
                 "--set", "data.data_seed=7"]) == 0
    return out


def mixed(real, store, *extra):
    return ["data.source=mixed", "data.mixed.sources=['synthetic', 'annotations']", f"data.annotations.file={real / 'annotations.jsonl'}",
            f"data.annotations.label_names={real / 'labels.json'}", "data.annotations.image_size=16", f"data.store={store}",
            "data.n_val=64", "data.n_test=96", *extra]


def test_batches_carry_the_member_as_domain_and_unlabelled_members_observe_nothing(real, tmp_path):
    data = build_data(tiny_config(*mixed(real, tmp_path / "s", "data.mixed.unlabelled=[1]", "data.unlabelled_ratio=1")).data)
    n_synthetic = 384 + 64 + 96
    assert len(data.source) == n_synthetic + 200 and data.observation.num_domains == 2
    assert all((data.splits[s] >= n_synthetic).all() for s in ("val", "test"))      # evaluated on the real images
    domain = data.source.domain(data.splits["train"])
    assert 0 < domain.sum() < len(domain)                                            # trained on both
    batch = next(iter(data.loader("train", {"image": "none"}, seed=0)))
    real_rows = batch["domain"] == 1
    assert real_rows.sum() == 16 and not batch["observed"][real_rows].any()          # ratio 1: half the batch
    assert (batch["observed"][~real_rows].sum(1) == 1).all()                         # synthetic: single positive
    # the labels of a real row are those of its annotation line
    row = int(data.splits["test"][0])
    line = json.loads((real / "annotations.jsonl").read_text().splitlines()[row - n_synthetic])
    names = data.label_space.names
    assert sorted(names[i] for i in data.labels.row(row)) == sorted(line["positives"])


def test_domain_branch_trains_on_synthetic_vs_real(real, tmp_path):
    cfg = tiny_config(*mixed(real, tmp_path / "s", "optim.epochs=1", "method.domain_branch={weight = 0.3}"))
    assert Trainer(cfg, tmp_path / "probe", DistInfo()).method.domain_branch.num_domains == 2
    metrics = train(cfg, tmp_path / "run")["metrics"]
    assert 0 < metrics["test/mAP_macro"] <= 1
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    acc = [e.value for e in events.Scalars("train/domain_acc")]
    assert acc and all(0 <= a <= 1 for a in acc)
