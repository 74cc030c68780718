import numpy as np

from mlml.data.pipeline import default_splits, split_hash


def test_split_hash_is_stable_and_changes_with_any_index_or_name():
    splits = default_splits(100, {"train": 60, "val": 20, "test": 20}, seed=0)
    assert split_hash(splits) == split_hash({k: v.copy() for k, v in reversed(list(splits.items()))})
    assert split_hash(splits) == split_hash(default_splits(100, {"train": 60, "val": 20, "test": 20}, seed=0))
    assert split_hash(splits) != split_hash(default_splits(100, {"train": 60, "val": 20, "test": 20}, seed=1))
    moved = dict(splits, val=np.sort(np.append(splits["val"][1:], splits["train"][0])))
    assert split_hash(splits) != split_hash(moved)
    assert split_hash(splits) != split_hash({"train": splits["val"], "val": splits["train"], "test": splits["test"]})
    assert len(split_hash(splits)) == 16
