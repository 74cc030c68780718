"""Grouped targets (the three cases), per-group cross-entropy, softmax label logits, decoding, the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlml.config import ModelConfig
from mlml.data.observation import PerGroup, SinglePositive
from mlml.groups import (
    decode_groups, group_cross_entropy, group_targets, known_negative, label_logits_from_softmax, pseudo_group_targets,
)
from mlml.labels import Group, LabelSpace
from mlml.models import build_model

# colour: red blue | object: circle square triangle | pattern (applies to circle, square): stripes dots
NAMES = ("red", "blue", "circle", "square", "triangle", "stripes", "dots")
SPACE = LabelSpace(NAMES, (Group("colour", (0, 1), True), Group("object", (2, 3, 4), True),
                           Group("pattern", (5, 6), True, True, (2, 3))))
NO_UNKNOWN = LabelSpace(NAMES, SPACE.groups[:2] + (Group("pattern", (5, 6), True, False, (2, 3)),))


def row(*names: str) -> list[float]:
    return [float(n in names) for n in NAMES]


def obs(*names: str) -> list[bool]:
    return [n in names for n in NAMES]


def test_known_negative_uses_exclusivity():
    t = torch.tensor([row("triangle")])
    o = torch.tensor([obs("triangle")])
    assert known_negative(t, o, SPACE)[0].tolist() == obs("circle", "square")


# (observed positives, observed labels) -> expected (class, mask) for colour, object, pattern
CASES = [
    # single positive: an object outside applies_to -> pattern known not to apply (unknown)
    (("triangle",), ("triangle",), {"colour": (2, False), "object": (2, True), "pattern": (2, True)}),
    # single positive: an object inside applies_to -> pattern applies but is unobserved
    (("circle",), ("circle",), {"colour": (2, False), "object": (0, True), "pattern": (2, False)}),
    # single positive colour: nothing known about the others
    (("blue",), ("blue",), {"colour": (1, True), "object": (3, False), "pattern": (2, False)}),
    # single positive pattern
    (("dots",), ("dots",), {"colour": (2, False), "object": (3, False), "pattern": (1, True)}),
    # per-group, pattern collection, no pattern: the annotator says none -> unknown
    ((), ("stripes", "dots"), {"colour": (2, False), "object": (3, False), "pattern": (2, True)}),
    # per-group, object collection with a square: pattern applies, unobserved
    (("square",), ("circle", "square", "triangle"), {"colour": (2, False), "object": (1, True), "pattern": (2, False)}),
    # full labels of a plain triangle image
    (("red", "triangle"), NAMES, {"colour": (0, True), "object": (2, True), "pattern": (2, True)}),
    # nothing observed
    ((), (), {"colour": (2, False), "object": (3, False), "pattern": (2, False)}),
]


@pytest.mark.parametrize("positives, observed, expected", CASES)
def test_three_cases(positives, observed, expected):
    out = group_targets(torch.tensor([row(*positives)]), torch.tensor([obs(*observed)]), SPACE)
    assert {g: (int(t.cls[0]), bool(t.mask[0])) for g, t in out.items()} == expected
    no_unknown = group_targets(torch.tensor([row(*positives)]), torch.tensor([obs(*observed)]), NO_UNKNOWN)
    cls, mask = expected["pattern"]
    assert bool(no_unknown["pattern"].mask[0]) == (mask and cls < 2)   # "unknown" is masked without the class


def _naive_targets(full: torch.Tensor, observed: torch.Tensor) -> list[dict]:
    """The rules written out per image for SPACE: (class, mask) per group."""
    out = []
    for f, o in zip(full.tolist(), observed.tolist()):
        pos = {NAMES[c] for c in range(len(NAMES)) if o[c] and f[c]}
        neg = {NAMES[c] for c in range(len(NAMES)) if o[c] and not f[c]}
        for g in SPACE.groups:  # exclusivity
            members = {NAMES[i] for i in g.labels}
            if pos & members:
                neg |= members - pos
        res = {}
        for g in SPACE.groups:
            names = [NAMES[i] for i in g.labels]
            hit = [k for k, n in enumerate(names) if n in pos]
            if hit:
                res[g.name] = (hit[0], True)
                continue
            none = all(n in neg for n in names) or (g.applies_to and all(NAMES[i] in neg for i in g.applies_to))
            res[g.name] = (len(names), bool(none and g.has_unknown))
        out.append(res)
    return out


@pytest.mark.parametrize("model", [SinglePositive, PerGroup])
def test_targets_under_observation_models_match_naive_rules(model):
    rng = np.random.default_rng(0)
    full = torch.zeros(200, len(NAMES), dtype=torch.bool)
    colour, shape, pattern = rng.integers(0, 2, 200), rng.integers(0, 3, 200), rng.integers(0, 2, 200)
    full[np.arange(200), colour] = True
    full[np.arange(200), 2 + shape] = True
    patterned = shape < 2
    full[np.arange(200)[patterned], 5 + pattern[patterned]] = True
    targets, observed = model(SPACE, seed=1)(np.arange(200), full)
    out = group_targets(targets, observed, SPACE)
    got = [{g: (int(t.cls[i]), bool(t.mask[i])) for g, t in out.items()} for i in range(200)]
    assert got == _naive_targets(full, observed)
    # with full labels, the unknown class is exactly "not applicable"
    truth = group_targets(full.float(), torch.ones_like(full), SPACE)["pattern"]
    assert torch.equal(truth.cls == 2, torch.from_numpy(~patterned)) and truth.mask.all()


def test_group_cross_entropy_against_a_loop():
    torch.manual_seed(0)
    logits = {"object": torch.randn(6, 3), "pattern": torch.randn(6, 3)}
    targets = {"object": (torch.tensor([0, 1, 2, 3, 3, 0]), torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.bool)),
               "pattern": (torch.tensor([2, 2, 0, 1, 2, 2]), torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool))}
    from mlml.groups import GroupTargets

    got = group_cross_entropy(logits, {g: GroupTargets(*t) for g, t in targets.items()})
    for g, (cls, mask) in targets.items():
        naive = sum(-torch.log_softmax(logits[g][i], 0)[cls[i]] for i in range(6) if mask[i]) / 6
        assert torch.allclose(got[g], naive)
    with pytest.raises(ValueError, match="no unknown output"):
        group_cross_entropy({"object": torch.randn(2, 3)}, {"object": GroupTargets(torch.tensor([3, 0]), torch.tensor([True, True]))})


@pytest.mark.parametrize("extra", [0, 1])
def test_label_logits_are_softmax_logits_and_stable(extra):
    torch.manual_seed(0)
    z = torch.randn(5, 3 + extra) * 3
    z[0] = torch.tensor([100.0, -100.0, 0.0] + [50.0] * extra)
    z.requires_grad_(True)
    out = label_logits_from_softmax(z, 3)
    assert torch.allclose(torch.sigmoid(out[1:]), torch.softmax(z[1:], 1)[:, :3], atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(out).all()


def test_decode_with_and_without_unknown():
    # per-label probabilities for (red, blue, circle, square, triangle, stripes, dots)
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.7, 0.1, 0.1, 0.2],    # pattern: unknown 0.7
                           [0.3, 0.7, 0.6, 0.3, 0.1, 0.5, 0.45]])  # pattern: stripes 0.5
    dec = decode_groups(scores, SPACE, {"colour": False, "object": False, "pattern": True})
    assert dec["pattern"].pred.tolist() == [2, 0]
    assert torch.allclose(dec["pattern"].probs[:, 2], torch.tensor([0.7, 0.05]))
    assert dec["colour"].probs[:, 2].tolist() == [0.0, 0.0] and dec["colour"].pred.tolist() == [0, 1]
    # softmax without an unknown output: never unknown
    dec = decode_groups(scores, NO_UNKNOWN, {"colour": False, "object": False, "pattern": False})
    assert dec["pattern"].pred.tolist() == [1, 0] and (dec["pattern"].probs[:, 2] == 0).all()
    # independent sigmoids: unknown = prod(1 - p), predicted when no class reaches the threshold
    dec = decode_groups(scores, SPACE, {})
    assert dec["pattern"].pred.tolist() == [2, 0]
    assert torch.allclose(dec["pattern"].probs[:, 2], torch.tensor([0.9 * 0.8, 0.5 * 0.55]))
    assert dec["object"].pred.tolist() == [1, 0]


def test_pseudo_targets_fill_only_confident_unobserved():
    from mlml.groups import GroupTargets

    t = {"pattern": GroupTargets(torch.tensor([0, 2, 2]), torch.tensor([True, False, False]))}
    teacher = {"pattern": torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.9, 0.8]])}
    out = pseudo_group_targets(teacher, t, threshold=0.8)["pattern"]
    assert out.cls.tolist() == [0, 2, 2] and out.mask.tolist() == [True, True, False]


def test_grouped_head_outputs():
    model = build_model(ModelConfig(width=8, head="grouped"), SPACE)
    out = model(torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8))
    assert out["logits"].shape == (4, 7)
    assert {g: tuple(z.shape) for g, z in out["group_logits"].items()} == {"colour": (4, 2), "object": (4, 3), "pattern": (4, 3)}
    p = torch.sigmoid(out["logits"])
    assert torch.allclose(p[:, 2:5], torch.softmax(out["group_logits"]["object"], 1), atol=1e-6)
    assert torch.allclose(p[:, 5:7], torch.softmax(out["group_logits"]["pattern"], 1)[:, :2], atol=1e-6)
    assert model.head.softmax_groups == {"colour": False, "object": False, "pattern": True}
    # non-exclusive groups are plain sigmoids and have no group_logits
    mixed = LabelSpace(NAMES, (Group("colour", (0, 1)),) + SPACE.groups[1:])
    out = build_model(ModelConfig(width=8, head="grouped"), mixed)(torch.zeros(2, 3, 16, 16))
    assert set(out["group_logits"]) == {"object", "pattern"} and out["logits"].shape == (2, 7)
    with pytest.raises(ValueError, match="one label and no unknown"):
        build_model(ModelConfig(width=8, head="grouped"), LabelSpace(("a", "b"), (Group("x", (0,), True), Group("y", (1,)))))
