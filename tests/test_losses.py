"""Losses against slow loops written from the papers' formulas; registry-wide stability checks."""

from __future__ import annotations

import math

import pytest
import torch

from mlml.losses import (
    LOSSES,
    em,
    entropy_from_logits,
    epr_regulariser,
    estimate_pos_weight,
    get_loss,
    large_loss_mask,
)

# Losses documented to read every target (full-label upper bound).
READS_ALL_TARGETS = {"bce"}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_batch(soft: bool = False, seed: int = 0, b: int = 7, c: int = 5):
    """(logits, targets, observed) in float64 with every kind of row.

    Row 0: unlabelled (all unobserved). Rows 1-3: single positive. Rows 4-5: random partial labels
    (observed negatives included). Row 6: fully observed. Unobserved targets hold garbage.
    """
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, c, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 2, (b, c), generator=g).double()
    if soft:
        targets = torch.rand(b, c, generator=g, dtype=torch.float64)
    observed = torch.rand(b, c, generator=g) < 0.5
    observed[0] = False
    observed[6] = True
    for row in (1, 2, 3):
        pos = int(torch.randint(0, c, (1,), generator=g))
        observed[row] = False
        observed[row, pos] = True
        targets[row, pos] = 1.0
    targets = torch.where(observed, targets, torch.rand(b, c, generator=g, dtype=torch.float64) * 7)
    return logits, targets, observed


def floats(t: torch.Tensor):
    return t.tolist()


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def nlog_p(x: float) -> float:  # -log p
    return -math.log(sig(x))


def nlog_1mp(x: float) -> float:  # -log(1 - p)
    return -math.log(1.0 - sig(x))


def bce1(x: float, y: float, w: float = 1.0) -> float:
    return w * y * nlog_p(x) + (1 - y) * nlog_1mp(x)


# ---------------------------------------------------------------------------------------------
# Slow references: explicit loops over entries, plain floats
# ---------------------------------------------------------------------------------------------


def ref_bce(X, Y, O, pos_weight=None):
    B, C = len(X), len(X[0])
    w = pos_weight or [1.0] * C
    return sum(bce1(X[b][c], Y[b][c], w[c]) for b in range(B) for c in range(C)) / (B * C)


def ref_masked_bce(X, Y, O, pos_weight=None):
    B, C = len(X), len(X[0])
    w = pos_weight or [1.0] * C
    total, n = 0.0, 0
    for b in range(B):
        for c in range(C):
            if O[b][c]:
                total += bce1(X[b][c], Y[b][c], w[c])
                n += 1
    return total / n if n else 0.0


def ref_an(X, Y, O, pos_weight=None):
    B, C = len(X), len(X[0])
    w = pos_weight or [1.0] * C
    total = 0.0
    for b in range(B):
        for c in range(C):
            total += bce1(X[b][c], Y[b][c], w[c]) if O[b][c] else nlog_1mp(X[b][c])
    return total / (B * C)


def ref_an_ls(X, Y, O, eps=0.1):
    B, C = len(X), len(X[0])
    total = 0.0
    for b in range(B):
        for c in range(C):
            x, t = X[b][c], (Y[b][c] if O[b][c] else 0.0)
            pos = (1 - eps) * nlog_p(x) + eps * nlog_1mp(x)
            neg = (1 - eps) * nlog_1mp(x) + eps * nlog_p(x)
            total += t * pos + (1 - t) * neg
    return total / (B * C)


def ref_wan(X, Y, O, gamma=None):
    B, C = len(X), len(X[0])
    g = 1.0 / (C - 1) if gamma is None else gamma
    total = 0.0
    for b in range(B):
        for c in range(C):
            total += bce1(X[b][c], Y[b][c]) if O[b][c] else g * nlog_1mp(X[b][c])
    return total / (B * C)


def ref_epr(X, Y, O, k=1.5):
    B, C = len(X), len(X[0])
    total = 0.0
    for b in range(B):
        for c in range(C):
            if O[b][c]:
                total += bce1(X[b][c], Y[b][c])
    expected = sum(sig(X[b][c]) for b in range(B) for c in range(C)) / B
    return total / (B * C) + (expected - k) ** 2 / C**2


def ref_em(X, Y, O, alpha=0.1):
    B, C = len(X), len(X[0])
    total = 0.0
    for b in range(B):
        for c in range(C):
            p = sig(X[b][c])
            entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
            total += bce1(X[b][c], Y[b][c]) if O[b][c] else -alpha * entropy
    return total / (B * C)


def _reduce(total, B, C, reduction):
    return total if reduction == "sum" else total / (B * C)


def ref_hill(X, Y, O, lam=1.5, margin=1.0, gamma=2.0, reduction="sum"):
    B, C = len(X), len(X[0])
    total = 0.0
    for b in range(B):
        for c in range(C):
            x, t = X[b][c], (Y[b][c] if O[b][c] else 0.0)
            p, pm = sig(x), sig(x - margin)
            total += t * (1 - pm) ** gamma * -math.log(pm) + (1 - t) * (lam - p) * p**2
    return _reduce(total, B, C, reduction)


def ref_splc(X, Y, O, tau=0.6, margin=1.0, gamma=2.0, pseudo_label=True, reduction="sum"):
    B, C = len(X), len(X[0])
    total = 0.0
    for b in range(B):
        for c in range(C):
            x, t = X[b][c], (Y[b][c] if O[b][c] else 0.0)
            p, pm = sig(x), sig(x - margin)
            pseudo = 1.0 if (pseudo_label and not O[b][c] and p > tau) else 0.0
            total += t * (1 - pm) ** gamma * -math.log(pm)
            total += pseudo * (1 - p) ** gamma * -math.log(p)
            total += (1 - t - pseudo) * p**gamma * -math.log(1 - p)
    return _reduce(total, B, C, reduction)


def ref_asl(X, Y, O, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, reduction="sum"):
    B, C = len(X), len(X[0])
    total = 0.0
    for b in range(B):
        for c in range(C):
            x, t = X[b][c], (Y[b][c] if O[b][c] else 0.0)
            p = sig(x)
            p_m = max(p - clip, 0.0)
            total += t * (1 - p) ** gamma_pos * -math.log(p)
            total += (1 - t) * p_m**gamma_neg * -math.log(1 - p_m)
    return _reduce(total, B, C, reduction)


def ref_partial_bce(X, Y, O, a=-4.45, b=5.45, c=1.0):
    B, C = len(X), len(X[0])
    total = 0.0
    for i in range(B):
        known = [j for j in range(C) if O[i][j]]
        if not known:
            continue
        g = a * (len(known) / C) ** c + b
        total += g / C * sum(bce1(X[i][j], Y[i][j]) for j in known)
    return total / B


def ref_focal(X, Y, O, gamma=2.0, alpha=None, reduction="mean"):
    B, C = len(X), len(X[0])
    a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
    total = 0.0
    for b in range(B):
        for c in range(C):
            x, t = X[b][c], (Y[b][c] if O[b][c] else 0.0)
            p = sig(x)
            total += t * a_pos * (1 - p) ** gamma * nlog_p(x)
            total += (1 - t) * a_neg * p**gamma * nlog_1mp(x)
    return _reduce(total, B, C, reduction)


def ref_pos_weight(Y, O, assume_negative=True, max_weight=100.0):
    B, C = len(Y), len(Y[0])
    out = []
    for c in range(C):
        pos = sum(Y[b][c] for b in range(B) if O[b][c])
        neg = sum(1 - Y[b][c] for b in range(B) if O[b][c])
        if assume_negative:
            neg += sum(1 for b in range(B) if not O[b][c])
        ratio = 1.0 if pos == 0 and neg == 0 else (max_weight if pos == 0 else neg / pos)
        out.append(min(max(ratio, 1 / max_weight), max_weight))
    return out


def ref_weighted_bce(X, Y, O, pos_weight=None):
    return ref_an(X, Y, O, pos_weight=pos_weight or ref_pos_weight(Y, O))


def ref_gr(X, Y, O, w=0.0, b=-2.0, mu=0.5, sigma=2.0, q2=0.01, q3=1.0):
    B, C = len(X), len(X[0])
    total = 0.0
    for i in range(B):
        for j in range(C):
            x = X[i][j]
            if O[i][j]:
                total += bce1(x, Y[i][j])
                continue
            p = sig(x)
            k = sig(w * p + b)
            v = math.exp(-((p - mu) ** 2) / (2 * sigma**2))
            l2 = -math.log(p) if q2 == 0 else (1 - p**q2) / q2
            l3 = -math.log(1 - p) if q3 == 0 else (1 - (1 - p) ** q3) / q3
            total += v * (k * l2 + (1 - k) * l3)
    return total / (B * C)


PW = [0.5, 2.0, 1.0, 3.0, 10.0]
CASES = [
    ("bce", {}, ref_bce),
    ("bce", {"pos_weight": PW}, ref_bce),
    ("masked_bce", {}, ref_masked_bce),
    ("masked_bce", {"pos_weight": PW}, ref_masked_bce),
    ("an", {}, ref_an),
    ("an", {"pos_weight": PW}, ref_an),
    ("an_ls", {}, ref_an_ls),
    ("an_ls", {"eps": 0.2}, ref_an_ls),
    ("wan", {}, ref_wan),
    ("wan", {"gamma": 0.3}, ref_wan),
    ("epr", {}, ref_epr),
    ("epr", {"k": 2.9}, ref_epr),
    ("em", {}, ref_em),
    ("em", {"alpha": 0.2}, ref_em),
    ("hill", {}, ref_hill),
    ("hill", {"lam": 1.2, "margin": 0.5, "gamma": 1.0, "reduction": "mean"}, ref_hill),
    ("splc", {}, ref_splc),
    ("splc", {"pseudo_label": False}, ref_splc),
    ("splc", {"tau": 0.3, "margin": 0.5, "gamma": 0.5, "reduction": "mean"}, ref_splc),
    ("asl", {}, ref_asl),
    ("asl", {"gamma_neg": 2.0, "gamma_pos": 1.0, "clip": 0.0, "reduction": "mean"}, ref_asl),
    ("partial_bce", {}, ref_partial_bce),
    ("partial_bce", {"a": -2.0, "b": 3.0, "c": 2.0}, ref_partial_bce),
    ("focal", {}, ref_focal),
    ("focal", {"gamma": 1.5, "alpha": 0.25, "reduction": "sum"}, ref_focal),
    ("weighted_bce", {}, ref_weighted_bce),
    ("weighted_bce", {"pos_weight": PW}, ref_weighted_bce),
    ("gr", {}, ref_gr),
    ("gr", {"w": 2.0, "b": -1.0, "mu": 0.8, "sigma": 0.5, "q2": 0.5, "q3": 0.3}, ref_gr),
    ("gr", {"w": 1.0, "q2": 0.0, "q3": 0.0}, ref_gr),
]


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize(
    "name,hparams,ref", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)]
)
def test_matches_slow_loop(name, hparams, ref, soft):
    logits, targets, observed = make_batch(soft=soft, seed=len(name) + 11 * soft)
    if name in READS_ALL_TARGETS:
        targets = targets.clamp(max=1.0) if soft else targets.clamp(max=1.0).round()
    torch_hp = {
        k: torch.tensor(v, dtype=torch.float64) if k == "pos_weight" else v
        for k, v in hparams.items()
    }
    got = get_loss(name, **torch_hp)(logits, targets, observed)
    want = ref(floats(logits), floats(targets), floats(observed), **hparams)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_cases_cover_every_builtin_loss():
    builtin = {n for n in LOSSES.names() if LOSSES.get(n).__module__ == "mlml.losses"}
    assert {name for name, _, _ in CASES} == builtin


# ---------------------------------------------------------------------------------------------
# Registry-wide properties (new entries are covered without new test code)
# ---------------------------------------------------------------------------------------------


def extreme_batch(kind: str):
    b, c = 4, 6
    g = torch.Generator().manual_seed(1)
    if kind == "mixed":
        logits = 100.0 * (2 * torch.randint(0, 2, (b, c), generator=g) - 1).float()
    else:
        logits = torch.full((b, c), 100.0 if kind == "+100" else -100.0)
    targets = torch.randint(0, 2, (b, c), generator=g).float()
    observed = torch.rand(b, c, generator=g) < 0.5
    observed[0] = False
    observed[1] = False
    observed[1, 2] = True
    targets[1, 2] = 1.0
    observed[3] = True
    return logits.requires_grad_(), targets, observed


@pytest.mark.parametrize("kind", ["+100", "-100", "mixed"])
@pytest.mark.parametrize("name", LOSSES.names())
def test_finite_at_extreme_logits(name, kind):
    logits, targets, observed = extreme_batch(kind)
    loss = get_loss(name)(logits, targets, observed)
    loss.backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("name", LOSSES.names())
def test_scalar_with_gradient(name, batch_size):
    g = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(batch_size, 4, generator=g)).requires_grad_()
    targets = torch.zeros(batch_size, 4)
    targets[:, 1] = 1.0
    observed = torch.zeros(batch_size, 4, dtype=torch.bool)
    observed[:, 1] = True  # single positive per image
    loss = get_loss(name)(logits, targets, observed)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert (logits.grad != 0).any()


@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - READS_ALL_TARGETS))
def test_unobserved_targets_never_read(name):
    logits, targets, observed = make_batch(seed=3)
    garbage = torch.where(observed, targets, torch.full_like(targets, math.nan))
    clean = torch.where(observed, targets, torch.zeros_like(targets))
    logits.requires_grad_()
    loss = get_loss(name)(logits, garbage, observed)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(get_loss(name)(logits, clean, observed).item(), rel=1e-12)


def test_masked_bce_without_observed_labels_is_zero_with_graph():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = get_loss("masked_bce")(logits, torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


@pytest.mark.parametrize("name", ["hill", "splc", "asl", "focal"])
def test_sum_is_mean_times_entries(name):
    logits, targets, observed = make_batch(seed=4)
    total = get_loss(name, reduction="sum")(logits, targets, observed)
    mean = get_loss(name, reduction="mean")(logits, targets, observed)
    assert total.item() == pytest.approx(mean.item() * logits.numel(), rel=1e-12)
    with pytest.raises(ValueError, match="'median'"):
        get_loss(name, reduction="median")(logits, targets, observed)


def test_bad_shapes_and_mask_dtype_raise():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must all be"):
        get_loss("an")(logits, torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        get_loss("an")(logits, torch.zeros(2, 3), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# get_loss and helpers
# ---------------------------------------------------------------------------------------------


def test_get_loss_unknown_name_lists_known():
    with pytest.raises(KeyError, match=r"unknown loss 'nope'; known: .*an_ls.*masked_bce"):
        get_loss("nope")


def test_get_loss_unknown_hparam_names_loss_and_key():
    with pytest.raises(TypeError, match=r"loss 'em' has no hyperparameter 'alhpa'"):
        get_loss("em", alhpa=0.2)
    with pytest.raises(TypeError, match="'observed'"):
        get_loss("an", observed=None)


def test_get_loss_binds_hparams():
    logits, targets, observed = make_batch(seed=5)
    assert get_loss("em", alpha=0.2)(logits, targets, observed) == em(
        logits, targets, observed, alpha=0.2
    )


def test_estimate_pos_weight_by_hand():
    # class 0: 2 pos, 1 unknown | class 1: 1 pos, 2 unknown | class 2: 1 obs neg, 2 unknown, no pos
    # class 3: nothing observed
    targets = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    observed = torch.tensor(
        [[True, False, True, False], [False, False, False, False], [True, True, False, False]]
    )
    want = [0.5, 2.0, 100.0, 100.0]
    assert estimate_pos_weight(targets, observed).tolist() == pytest.approx(want)
    assert estimate_pos_weight(targets, observed, assume_negative=False).tolist() == pytest.approx(
        [0.01, 0.01, 100.0, 1.0]
    )
    assert estimate_pos_weight(targets, observed, max_weight=10).tolist() == pytest.approx(
        [0.5, 2.0, 10.0, 10.0]
    )


def test_estimate_pos_weight_matches_loop():
    _, targets, observed = make_batch(soft=True, seed=6)
    for assume in (True, False):
        got = estimate_pos_weight(targets, observed, assume_negative=assume)
        want = ref_pos_weight(floats(targets), floats(observed), assume)
        assert got.tolist() == pytest.approx(want)


def test_entropy_from_logits():
    x = torch.tensor([-100.0, -5.0, -0.3, 0.0, 0.7, 20.0, 100.0], dtype=torch.float64)
    want = []
    for v in x.tolist():  # -log p = log(1 + e^-x), accurate in float64 where p is near 0 or 1
        nlp, nlq = math.log1p(math.exp(-v)), math.log1p(math.exp(v))
        want.append(sig(v) * nlp + sig(-v) * nlq)
    assert entropy_from_logits(x).tolist() == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert entropy_from_logits(torch.tensor(0.0)).item() == pytest.approx(math.log(2))


def test_epr_regulariser():
    probs = torch.tensor([[0.5, 0.5, 1.0], [0.0, 0.25, 0.75]])
    # row sums 2.0 and 1.0: mean 1.5 expected positives per image
    assert epr_regulariser(probs, 1.0).item() == pytest.approx((1.5 - 1.0) ** 2 / 9)
    assert epr_regulariser(probs, 1.5).item() == 0.0


def test_large_loss_mask():
    loss = torch.tensor([[5.0, 1.0, 3.0], [4.0, 9.0, 2.0]])
    unobserved = torch.tensor([[True, True, True], [True, False, True]])
    want = torch.tensor([[True, False, True], [True, False, False]])
    assert torch.equal(large_loss_mask(loss, unobserved, 3), want)
    assert not large_loss_mask(loss, unobserved, 0).any()
    assert torch.equal(large_loss_mask(loss, unobserved, 99), unobserved)


# Losses whose autograd gradient is deliberately not the derivative of their value.
DETACHED_WEIGHTS = {"asl", "gr"}


@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - DETACHED_WEIGHTS))
def test_gradient_matches_finite_differences(name):
    logits, targets, observed = make_batch(seed=7, c=3)
    targets = targets.clamp(max=1.0).round()
    logits.requires_grad_()
    loss = get_loss(name)
    assert torch.autograd.gradcheck(lambda x: loss(x, targets, observed), (logits,), fast_mode=True)


def test_asl_focusing_weights_carry_no_gradient():
    logits, targets, observed = make_batch(seed=8)
    targets = targets.clamp(max=1.0).round()
    logits.requires_grad_()
    gamma_neg, gamma_pos, clip = 4.0, 1.0, 0.05
    loss = get_loss("asl", gamma_pos=gamma_pos)(logits, targets, observed)
    (grad,) = torch.autograd.grad(loss, logits)
    X, Y, O = floats(logits.detach()), floats(targets), floats(observed)
    for b in range(len(X)):
        for c in range(len(X[0])):
            p = sig(X[b][c])
            if O[b][c] and Y[b][c] == 1:  # w * d(-log p)/dx, w = (1 - p)^g+ held constant
                want = (1 - p) ** gamma_pos * -(1 - p)
            elif p > clip:  # w * d(-log(1 - p + m))/dx, w = (p - m)^g- held constant
                want = (p - clip) ** gamma_neg * p * (1 - p) / (1 - p + clip)
            else:  # clipped: zero weight and zero derivative
                want = 0.0
            assert grad[b, c].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Gradients of the closed forms against the slow references
# ---------------------------------------------------------------------------------------------


def finite_difference_grad(ref, X, Y, O, hparams, h=1e-6):
    """Central differences of a slow-loop reference loss in each logit (float64, O(h^2))."""
    grad = []
    for b in range(len(X)):
        row = []
        for c in range(len(X[0])):
            up = [r[:] for r in X]
            down = [r[:] for r in X]
            up[b][c] += h
            down[b][c] -= h
            row.append((ref(up, Y, O, **hparams) - ref(down, Y, O, **hparams)) / (2 * h))
        grad.append(row)
    return torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize(
    "name,hparams,ref", [case for case in CASES if case[0] not in DETACHED_WEIGHTS],
    ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES) if n not in DETACHED_WEIGHTS],
)
def test_gradient_matches_slow_loop(name, hparams, ref, soft):
    """The closed-form gradients (every built-in loss computes its own) equal the derivative of the
    published formula, written as a loop, including masks, soft targets and hyperparameters."""
    logits, targets, observed = make_batch(soft=soft, seed=len(name) + 5 + 11 * soft)
    if name in READS_ALL_TARGETS:
        targets = targets.clamp(max=1.0) if soft else targets.clamp(max=1.0).round()
    torch_hp = {
        k: torch.tensor(v, dtype=torch.float64) if k == "pos_weight" else v
        for k, v in hparams.items()
    }
    logits.requires_grad_()
    (got,) = torch.autograd.grad(get_loss(name, **torch_hp)(logits, targets, observed), logits)
    want = finite_difference_grad(ref, floats(logits.detach()), floats(targets), floats(observed), hparams)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(n for n in LOSSES.names() if LOSSES.get(n).__module__ == "mlml.losses"))
def test_float32_agrees_with_float64_at_large_logits(name):
    """Value and gradient in float32 equal the float64 ones to float32 rounding, for logits up to
    |x| = 100 (no overflow, no cancellation in the softplus / sigmoid forms)."""
    g = torch.Generator().manual_seed(9)
    logits = (torch.rand(6, 40, generator=g, dtype=torch.float64) * 200 - 100)
    logits[0, :7] = torch.tensor([-100.0, -30.0, -15.0, 0.0, 15.0, 30.0, 100.0], dtype=torch.float64)
    targets = torch.randint(0, 2, (6, 40), generator=g).double()
    observed = torch.rand(6, 40, generator=g) < 0.3
    observed[1] = True
    results = {}
    for dtype in (torch.float32, torch.float64):
        x = logits.to(dtype).requires_grad_()
        value = get_loss(name)(x, targets.to(dtype), observed)
        (grad,) = torch.autograd.grad(value, x)
        results[dtype] = (value.double(), grad.double())
    (v32, g32), (v64, g64) = results[torch.float32], results[torch.float64]
    torch.testing.assert_close(v32, v64, rtol=1e-5, atol=0)
    torch.testing.assert_close(g32, g64, rtol=1e-5, atol=1e-7 * g64.abs().max().item())


def test_closed_forms_refuse_targets_that_need_a_gradient():
    logits, targets, observed = make_batch(seed=10)
    with pytest.raises(ValueError, match="logits only"):
        get_loss("an")(logits.requires_grad_(), targets.requires_grad_(), observed)


def test_gr_by_hand():
    # one unobserved entry at x = 0 (p = 1/2) and one observed positive at x = 0, defaults:
    # k = sigmoid(0 * 0.5 - 2), v = exp(0) = 1, L2 = (1 - 0.5^0.01) / 0.01, L3 = 0.5; positive: log 2.
    logits = torch.zeros(1, 2, dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    observed = torch.tensor([[True, False]])
    k = 1 / (1 + math.exp(2.0))
    unknown = k * (1 - 0.5**0.01) / 0.01 + (1 - k) * 0.5
    assert get_loss("gr")(logits, targets, observed).item() == pytest.approx((math.log(2) + unknown) / 2, rel=1e-12)
    # all unknown: no positive term; v < 1 once p moves off mu
    observed = torch.zeros(1, 2, dtype=torch.bool)
    x = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    p = sig(2.0)
    v = math.exp(-((p - 0.5) ** 2) / 8)
    k2 = 1 / (1 + math.exp(2.0))
    second = v * (k2 * (1 - p**0.01) / 0.01 + (1 - k2) * p)
    assert get_loss("gr")(x, targets, observed).item() == pytest.approx((unknown + second) / 2, rel=1e-12)


def test_gr_pseudo_label_and_weight_carry_no_gradient():
    logits, targets, observed = make_batch(seed=9)
    targets = targets.clamp(max=1.0).round()
    logits.requires_grad_()
    w, b, mu, sigma, q2, q3 = 2.0, -1.0, 0.6, 0.7, 0.3, 1.5
    loss = get_loss("gr", w=w, b=b, mu=mu, sigma=sigma, q2=q2, q3=q3)(logits, targets, observed)
    (grad,) = torch.autograd.grad(loss, logits)
    X, Y, O = floats(logits.detach()), floats(targets), floats(observed)
    n = len(X) * len(X[0])
    for i in range(len(X)):
        for j in range(len(X[0])):
            p = sig(X[i][j])
            if O[i][j]:  # BCE: p - y
                want = p - Y[i][j]
            else:  # v [k dL2/dx + (1 - k) dL3/dx], k and v held constant
                k, v = sig(w * p + b), math.exp(-((p - mu) ** 2) / (2 * sigma**2))
                want = v * (k * -(p**q2) * (1 - p) + (1 - k) * (1 - p) ** q3 * p)
            assert grad[i, j].item() == pytest.approx(want / n, rel=1e-9, abs=1e-12)
