import numpy as np
import re

import pytest
import torch

from mlml.config import ConfigError
from mlml.data.observation import OBSERVATIONS, build_observation, hash_uniform
from mlml.labels import Group, LabelSpace

SPACE = LabelSpace(tuple("abcdefg"), (Group("colour", (0, 1, 2)), Group("object", (3, 4, 5, 6))))


def full_labels(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.rand(n, 7, generator=g) < 0.4
    full[0] = False                                         # an image without positives
    return np.arange(n) * 3 + 11, full                      # arbitrary source rows


def test_single_positive_exactly_one_true_positive_fixed_across_calls():
    rows, full = full_labels()
    obs = build_observation("single_positive", SPACE, seed=3, args={})
    t1, o1 = obs(rows, full)
    perm = np.random.default_rng(0).permutation(len(rows))   # another epoch, another order
    t2, o2 = obs(rows[perm], full[perm])
    has = full.any(1)
    assert torch.equal(o1.sum(1), has.long())
    assert bool((t1[o1] == 1).all()) and bool((full[o1]).all())
    assert torch.equal(o2, o1[perm]) and torch.equal(t2, t1[perm])
    assert not bool((t1.bool() & ~o1).any())


def test_single_positive_is_uniform_among_positives():
    rows = np.arange(20000)
    full = torch.zeros(20000, 7, dtype=torch.bool)
    full[:, [1, 4, 6]] = True
    _, o = build_observation("single_positive", SPACE, 0, {})(rows, full)
    freq = o.float().mean(0)[[1, 4, 6]]
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.02)


def test_per_group_observes_one_whole_group():
    rows, full = full_labels()
    obs = build_observation("per_group", SPACE, 0, {})
    targets, observed = obs(rows, full)
    groups = [SPACE.group_mask(g) for g in SPACE.groups]
    domain = torch.from_numpy(obs.domain(rows))
    for i in range(len(rows)):
        assert torch.equal(observed[i], groups[domain[i]])
    assert torch.equal(targets.bool(), full & observed)
    assert set(domain.tolist()) == {0, 1} and obs.num_domains == 2


def test_partial_rate_and_full_and_unlabelled():
    rows, full = full_labels(4000)
    _, o = build_observation("partial", SPACE, 0, {"p": 0.3})(rows, full)
    assert abs(o.float().mean().item() - 0.3) < 0.02
    t, o = build_observation("full", SPACE, 0, {})(rows, full)
    assert bool(o.all()) and torch.equal(t.bool(), full)
    t, o = build_observation("unlabelled", SPACE, 0, {})(rows, full)
    assert not bool(o.any()) and not bool(t.any())


def test_labelled_fraction_makes_the_rest_unlabelled():
    rows, full = full_labels(4000)
    obs = build_observation("single_positive", SPACE, 0, {"labelled_fraction": 0.1})
    _, o = obs(rows, full)
    labelled = o.any(1)
    assert abs(labelled.float().mean().item() - 0.1) < 0.02
    assert torch.equal(torch.from_numpy(obs.domain(rows)), (~torch.from_numpy(obs.labelled(rows))).long())


def test_errors():
    with pytest.raises(KeyError, match="single_positive"):
        build_observation("nope", SPACE, 0, {})
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'data.observation_args.q'")):
        build_observation("full", SPACE, 0, {"q": 1})
    with pytest.raises(ConfigError, match=re.escape("'data.observation_args.p' must be in (0, 1], got 0.0")):
        build_observation("partial", SPACE, 0, {"p": 0})
    with pytest.raises(ConfigError, match=re.escape("'data.observation_args.labelled_fraction' must be in [0, 1]")):
        build_observation("single_positive", SPACE, 0, {"labelled_fraction": 1.5})


def test_hash_uniform_is_deterministic_and_uniform():
    u = hash_uniform(5, np.arange(100000))
    assert np.array_equal(u, hash_uniform(5, np.arange(100000)))
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
    assert not np.array_equal(u, hash_uniform(6, np.arange(100000)))


def test_hash_uniform_of_python_ints_equals_the_array_path():
    keys = np.random.default_rng(0).integers(-(2**62), 2**62, (500, 4))
    for row in keys:
        ints = [int(k) for k in row]
        assert hash_uniform(*ints) == hash_uniform(*[np.asarray(k) for k in row])   # bit for bit


def test_registry_lists_all():
    assert set(OBSERVATIONS.names()) == {"full", "single_positive", "partial", "per_group", "unlabelled", "annotated"}


def test_annotated_observes_stored_positives_and_known_negatives():
    from mlml.data.label_store import LabelStore

    store = LabelStore.from_lists([[0, 3], [], [6]], 7, negatives=[[1], [2, 4], []])
    obs = build_observation("annotated", SPACE, seed=0, args={}, labels=store)
    rows = np.array([2, 0, 1])
    targets, observed = obs(rows, store.dense(rows))
    assert [np.flatnonzero(o).tolist() for o in observed.numpy()] == [[6], [0, 1, 3], [2, 4]]
    assert [np.flatnonzero(t).tolist() for t in targets.numpy()] == [[6], [0, 3], []]
    with pytest.raises(ValueError, match="needs the source's label store"):
        build_observation("annotated", SPACE, seed=0, args={})


def test_balanced_draw_labels_every_class_alike_and_reads_what_observe_picks():
    from mlml.data.label_store import LabelStore
    from mlml.data.observation import balanced_shares
    n = 20000
    g = torch.Generator().manual_seed(1)
    full = torch.rand(n, 7, generator=g) < torch.tensor([0.6, 0.3, 0.1, 0.05, 0.4, 0.2, 0.02])
    full[:50] = False                                       # images without positives
    store, rows = LabelStore.from_dense(full), np.arange(n)
    plain = build_observation("single_positive", SPACE, 5, {"labelled_fraction": 0.05})
    obs = build_observation("single_positive", SPACE, 5, {"labelled_fraction": 0.05, "balanced": True}, store)
    _, seen = obs(rows, full)
    labelled = obs.labelled(rows)
    every = plain.observe(rows, full)                       # what each image observes when labelled
    assert torch.equal(seen, every & torch.from_numpy(labelled)[:, None])
    assert torch.equal(torch.from_numpy(obs.observed_positive(rows)),
                       torch.where(every.any(1), every.float().argmax(1), torch.tensor(-1)))
    per_class = seen.sum(0).numpy()
    per_class_plain = plain(rows, full)[1].sum(0).numpy()
    with_positive = int(full.any(1).sum())
    assert abs(labelled[full.any(1).numpy()].mean() - 0.05) < 0.01
    assert per_class_plain.max() / per_class_plain.min() > 20        # the random draw follows frequency
    assert per_class.max() / per_class.min() < 1.6                   # the balanced draw does not
    assert np.allclose(per_class.mean(), 0.05 * with_positive / 7, rtol=0.1)
    shares = balanced_shares(np.array([10, 0, 1000, 100]), 150.0)   # 10 whole, 70 each for the others
    assert np.allclose(shares, [1.0, 0.0, 0.07, 0.7]) and np.isclose((shares * [10, 0, 1000, 100]).sum(), 150)
    assert torch.equal(torch.from_numpy(obs.domain(rows)), (~torch.from_numpy(labelled)).long())
    with pytest.raises(ValueError, match="label store"):
        build_observation("single_positive", SPACE, 5, {"labelled_fraction": 0.05, "balanced": True})
