import numpy as np
import pytest
import torch

from mlml.data.label_store import LabelStore, LabelStoreBuilder


def test_roundtrip_against_dense():
    rng = np.random.default_rng(0)
    dense = rng.random((200, 37)) < 0.08
    dense[5] = False                                       # a row without positives
    store = LabelStore.from_dense(dense)
    rows = rng.integers(0, 200, size=64)
    assert torch.equal(store.dense(rows), torch.from_numpy(dense[rows]))
    assert torch.equal(store.dense(np.arange(200)), torch.from_numpy(dense))
    lists = [np.flatnonzero(r).tolist() for r in dense]
    other = LabelStore.from_lists(lists, 37)
    assert np.array_equal(other.indptr, store.indptr) and np.array_equal(other.indices, store.indices)
    assert np.array_equal(store.label_counts(), dense.sum(0))
    assert store.row(5).size == 0


def test_from_lists_validates():
    with pytest.raises(ValueError, match="outside"):
        LabelStore.from_lists([[0, 3]], 3)
    with pytest.raises(ValueError, match="twice"):
        LabelStore.from_lists([[1, 1]], 3)


def random_labels(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Random sparse positives and known negatives (disjoint), bool (n, c) each."""
    pos = rng.random((n, c)) < 0.05
    neg = (rng.random((n, c)) < 0.1) & ~pos
    return pos, neg


@pytest.mark.parametrize("c", [37, 70_000])                 # uint16 and int32 label indices
def test_streamed_store_roundtrip_against_dense(tmp_path, c):
    import pickle

    rng = np.random.default_rng(1)
    pos, neg = random_labels(rng, 300, 37)
    pos = np.pad(pos, ((0, 0), (0, c - 37)))
    neg = np.pad(neg, ((0, 0), (0, c - 37)))
    pos[:, -1] = rng.random(300) < 0.5                       # the last label is used too
    neg[:, -1] = False
    builder = LabelStoreBuilder(tmp_path / "store", c, flush_rows=7)   # many small flushes
    for i in range(300):
        builder.add(rng.permutation(np.flatnonzero(pos[i])).tolist(), np.flatnonzero(neg[i]).tolist())
    store = builder.close()
    assert store.indices.dtype == (np.uint16 if c <= 65536 else np.int32) and store.indptr.dtype == np.uint32
    assert isinstance(store.indices, np.memmap) and sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "indices.npy", "indptr.npy", "meta.json", "neg_indices.npy", "neg_indptr.npy"]
    rows = rng.integers(0, 300, size=64)
    for s in (store, LabelStore.open(tmp_path / "store"), pickle.loads(pickle.dumps(store))):
        assert torch.equal(s.dense(rows), torch.from_numpy(pos[rows]))
        assert torch.equal(s.dense_negatives(rows), torch.from_numpy(neg[rows]))
        assert torch.equal(s.dense(np.arange(300)), torch.from_numpy(pos))
    assert pickle.loads(pickle.dumps(store)).path == store.path        # pickles as its path, not its arrays
    for i in rng.integers(0, 300, size=20):
        assert store.row(i).tolist() == np.flatnonzero(pos[i]).tolist()
        assert store.negatives(i).tolist() == np.flatnonzero(neg[i]).tolist()
    assert np.array_equal(store.label_counts(), pos.sum(0))


def test_store_without_negatives_and_save(tmp_path):
    dense = np.random.default_rng(2).random((50, 9)) < 0.2
    store = LabelStore.from_dense(dense).save(tmp_path / "s")
    assert not store.has_negatives and not (tmp_path / "s" / "neg_indptr.npy").exists()
    assert torch.equal(store.dense(np.arange(50)), torch.from_numpy(dense))
    assert not store.dense_negatives([0, 1]).any() and store.negatives(3).size == 0
    empty = LabelStore.from_lists([[], []], 4).save(tmp_path / "e")
    assert len(empty) == 2 and not empty.dense([0, 1]).any()


def test_builder_errors_name_the_row(tmp_path):
    builder = LabelStoreBuilder(tmp_path / "s", 5, flush_rows=2)
    builder.add([1], [2])
    with pytest.raises(ValueError, match="row 1: label 3 is both positive and negative"):
        builder.add([3], [3])
    with pytest.raises(ValueError, match="row 2: positive label index 9 outside"):
        LabelStoreBuilder(tmp_path / "t", 5).add_chunk([1, 0, 1], [0, 9])
    with pytest.raises(ValueError, match="both positive and negative"):
        LabelStore.from_lists([[0], [1]], 3, negatives=[[], [1]])
