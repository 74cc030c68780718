"""Stateful single-positive methods (mlml/methods/single_positive.py), each checked against a slow,
obvious implementation of its published rule on small inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mlml.checkpoint import load_checkpoint
from mlml.config import MethodConfig
from mlml.labels import LabelSpace
from mlml.losses import gr, splc
from mlml.methods import METHODS, MethodContext, build_method
from mlml.methods.single_positive import GRSettings, gr_schedule, large_loss_count
from mlml.trainer import build_optimizer, train
from tests.conftest import stop_mid_run, tiny_config

STATEFUL = ["role", "em_apl", "ll_r", "ll_ct", "ll_cp", "splc", "gr"]


# ---------------------------------------------------------------------------------------------
# Helpers: a context over given training labels, a "model" that returns fixed logits, a batch
# ---------------------------------------------------------------------------------------------


def single_positive_labels(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One observed positive per row (a random class), everything else unobserved."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(c, (n,), generator=g)
    observed = torch.zeros(n, c, dtype=torch.bool)
    observed[torch.arange(n), cls] = True
    return observed.float(), observed


def make_ctx(targets: torch.Tensor, observed: torch.Tensor, epochs: int = 3) -> MethodContext:
    n, c = targets.shape
    return MethodContext(
        label_space=LabelSpace(tuple(f"l{i}" for i in range(c))),
        num_train=n,
        steps_per_epoch=1,
        epochs=epochs,
        train_labels=lambda idx: (targets[idx], observed[idx]),
    )


def make(name: str, targets: torch.Tensor, observed: torch.Tensor, epochs: int = 3, **args):
    return build_method(MethodConfig(name=name, args=args), make_ctx(targets, observed, epochs))


class FixedLogits(nn.Module):
    """Ignores the images and returns the given logits (as a parameter, so they get gradient)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone().float())

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.logits}


def make_batch(index, targets: torch.Tensor, observed: torch.Tensor) -> dict[str, torch.Tensor]:
    index = torch.as_tensor(index, dtype=torch.long)
    return {
        "image": torch.zeros(len(index), 3, 2, 2, dtype=torch.uint8),
        "targets": targets[index],
        "observed": observed[index],
        "index": index,
        "domain": torch.zeros(len(index), dtype=torch.long),
    }


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(x: float, y: float) -> float:
    p = sig(x)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


@pytest.mark.parametrize("name", STATEFUL)
def test_unknown_args_key_is_an_error_naming_it(name):
    targets, observed = single_positive_labels(8, 3)
    with pytest.raises(ValueError, match="'method.args.nonsense'"):
        make(name, targets, observed, nonsense=1)


@pytest.mark.parametrize("name", STATEFUL)
def test_loss_args_are_refused(name):
    targets, observed = single_positive_labels(8, 3)
    cfg = MethodConfig(name=name, loss_args={"k": 2.0})
    with pytest.raises(ValueError, match="method.args"):
        build_method(cfg, make_ctx(targets, observed))


# ---------------------------------------------------------------------------------------------
# ROLE
# ---------------------------------------------------------------------------------------------


def slow_role(x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, k: float) -> float:
    """0.5 y[-log f - log g] + 0.5[BCE(f, g) + BCE(g, f)] per entry, mean, + 0.5[EPR(f) + EPR(g)]."""
    b, c = x.shape
    total = 0.0
    for i in range(b):
        for j in range(c):
            f, g = sig(float(x[i, j])), sig(float(z[i, j]))
            pos = float(y[i, j]) * (-math.log(f) - math.log(g))
            cross = -(g * math.log(f) + (1 - g) * math.log(1 - f)) - (f * math.log(g) + (1 - f) * math.log(1 - g))
            total += 0.5 * pos + 0.5 * cross
    epr = 0.0
    for m in (x, z):
        mean_sum = sum(sum(sig(float(m[i, j])) for j in range(c)) for i in range(b)) / b
        epr += (mean_sum - k) ** 2 / c**2
    return total / (b * c) + 0.5 * epr


def test_role_loss_equals_the_elementwise_formula():
    targets, observed = single_positive_labels(6, 4)
    observed[0, (int(targets[0].argmax()) + 1) % 4] = True            # one observed negative
    method = make("role", targets, observed, k=2.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        method.table.copy_(3 * torch.randn(6, 4, generator=g))
    index = [4, 0, 2]
    x = 3 * torch.randn(3, 4, generator=g)
    z = method.table[index].detach()
    model = FixedLogits(x)
    loss = method.training_step(make_batch(index, targets, observed), model)["loss"]
    y = targets[index] * observed[index]
    assert float(loss.detach()) == pytest.approx(slow_role(x, z, y, 2.0), rel=1e-5)

    # Each side fits the other's detached prediction, so with a = f or g and o the other one:
    # d loss / d a = [0.5 y (a - 1) + 0.5 (a - o)] / BC + 0.5 d EPR(a) / d a.
    loss.backward()
    b, c = x.shape

    def expected_grad(own, other):
        d_epr = 0.5 * 2 * (own.sum(1).mean() - 2.0) / c**2 / b * own * (1 - own)
        return (0.5 * y * (own - 1) + 0.5 * (own - other)) / (b * c) + d_epr

    p, q = torch.sigmoid(x), torch.sigmoid(z)
    torch.testing.assert_close(model.logits.grad, expected_grad(p, q), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(method.table.grad[index], expected_grad(q, p), rtol=1e-4, atol=1e-7)


def test_role_table_initialisation():
    targets, observed = single_positive_labels(50, 5)
    observed[3, (int(targets[3].argmax()) + 1) % 5] = True            # an observed negative
    table = make("role", targets, observed).table.detach()
    positives = observed & (targets > 0.5)
    negatives = observed & (targets < 0.5)
    others = ~observed
    torch.testing.assert_close(table[positives], torch.full((50,), math.log(0.995 / 0.005)))
    assert torch.allclose(table[negatives], torch.tensor(math.log(0.005 / 0.995)))
    lo, hi = math.log(0.4 / 0.6), math.log(0.6 / 0.4)
    assert table[others].min() >= lo and table[others].max() <= hi
    assert table[others].std() > 0.5 * (hi - lo) / math.sqrt(12)    # spread, not a constant
    again = make("role", targets, observed).table.detach()
    other_seed = make("role", targets, observed, seed=1).table.detach()
    assert torch.equal(table, again) and not torch.equal(table, other_seed)


def test_role_table_gets_gradient_and_its_own_lr(tmp_path):
    targets, observed = single_positive_labels(10, 4)
    method = make("role", targets, observed)
    index = [7, 2]
    method.training_step(make_batch(index, targets, observed), FixedLogits(torch.randn(2, 4)))["loss"].backward()
    grad = method.table.grad
    assert (grad[index] != 0).all()
    assert (grad[[i for i in range(10) if i not in index]] == 0).all()

    cfg = tiny_config("method.name=role", "optim.weight_decay=0.1")
    optimizer = build_optimizer(cfg, nn.Linear(3, 4), method)
    (group,) = [g for g in optimizer.param_groups if any(p is method.table for p in g["params"])]
    assert group["lr_scale"] == 10.0 and group["lr"] == pytest.approx(10 * cfg.optim.lr)
    assert group["weight_decay"] == 0.0


def test_role_refuses_a_table_over_max_table_entries():
    def no_labels(idx):
        raise AssertionError("labels read before the size check")

    ctx = MethodContext(label_space=LabelSpace(tuple(f"l{i}" for i in range(100))), num_train=1000,
                        steps_per_epoch=1, epochs=1, train_labels=no_labels)
    with pytest.raises(ValueError, match=r"1,000 x 100 = 100,000 entries.*max_table_entries = 99,999"):
        build_method(MethodConfig(name="role", args={"max_table_entries": 99_999}), ctx)


# ---------------------------------------------------------------------------------------------
# Large loss rejection / correction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "epoch, b, c, d, k",
    [(0, 32, 10, 0.2, 0), (1, 32, 10, 0.2, 1), (2, 16, 80, 0.2, 6), (3, 100, 50, 0.2, 30), (4, 10, 10, 5.0, 20),
     (3, 50, 20, 1.1, 33)],                                 # 33.00000000000001 in floats
)
def test_large_loss_count(epoch, b, c, d, k):
    assert large_loss_count(epoch, b, c, d) == k


def an_losses(x: torch.Tensor, y: torch.Tensor) -> list[list[float]]:
    return [[bce(float(x[i, j]), float(y[i, j])) for j in range(x.shape[1])] for i in range(x.shape[0])]


def slow_large_loss(x, y, unobserved, k, replace):
    """Sort the unobserved entries by loss, replace the k largest: `replace(i, j)` gives the new value."""
    losses = an_losses(x, y)
    candidates = sorted(((losses[i][j], i, j) for i in range(x.shape[0]) for j in range(x.shape[1]) if unobserved[i, j]),
                        reverse=True)
    chosen = {(i, j) for _, i, j in candidates[:k]}
    total = sum(replace(i, j) if (i, j) in chosen else losses[i][j] for i in range(x.shape[0]) for j in range(x.shape[1]))
    return total / x.numel(), chosen


def ll_setup(seed=0):
    targets, observed = single_positive_labels(8, 5, seed)
    g = torch.Generator().manual_seed(seed + 10)
    x = 3 * torch.randn(8, 5, generator=g)
    x[observed] = -6.0                         # observed positives have the largest losses: never chosen
    return targets, observed, x


@pytest.mark.parametrize("name, corrected", [("ll_r", False), ("ll_ct", True)])
def test_large_loss_rejects_or_corrects_the_k_largest_unobserved_losses(name, corrected):
    targets, observed, x = ll_setup()
    index = [1, 3, 4, 6]
    xb = x[index]
    method = make(name, targets, observed, delta_rel=15.0)     # k = ceil(4 * 5 * (t - 1) * 0.15)
    batch = make_batch(index, targets, observed)

    method.on_epoch_start(0)
    out = method.training_step(batch, FixedLogits(xb))
    plain, _ = slow_large_loss(xb, targets[index], ~observed[index], 0, None)
    assert float(out["modified"]) == 0 and float(out["loss"].detach()) == pytest.approx(plain, rel=1e-6)

    for epoch, k in [(1, 3), (2, 6)]:
        method.on_epoch_start(epoch)
        out = method.training_step(batch, FixedLogits(xb))
        replace = (lambda i, j: -math.log(sig(float(xb[i, j])))) if corrected else (lambda i, j: 0.0)
        expected, _ = slow_large_loss(xb, targets[index], ~observed[index], k, replace)
        assert float(out["modified"]) == k
        assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-6)


def test_ll_cp_corrections_persist_and_survive_a_state_dict_round_trip():
    targets, observed, x = ll_setup(seed=1)
    method = make("ll_cp", targets, observed, delta_rel=10.0)  # k = ceil(4 * 5 * 0.1) = 2 per batch
    index = [0, 2, 5, 7]
    batch = make_batch(index, targets, observed)
    y, unobserved = targets[index], ~observed[index]
    xb = x[index]

    method.on_epoch_start(0)
    method.training_step(batch, FixedLogits(xb))
    assert len(method.corrected_entries()) == 0

    method.on_epoch_start(1)
    out = method.training_step(batch, FixedLogits(xb))
    expected, chosen = slow_large_loss(xb, y, unobserved, 2, lambda i, j: -math.log(sig(float(xb[i, j]))))
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-6)
    first = {(index[i], j) for i, j in chosen}
    assert {tuple(e) for e in method.corrected_entries().tolist()} == first

    # Next epoch: the corrected entries are observed positives now; two more get corrected.
    method.on_epoch_start(2)
    x2 = xb.flip(1)
    out = method.training_step(batch, FixedLogits(x2))
    y2, unobserved2 = y.clone(), unobserved.clone()
    for r, j in first:
        y2[index.index(r), j], unobserved2[index.index(r), j] = 1.0, False
    expected, chosen = slow_large_loss(x2, y2, unobserved2, 2, lambda i, j: -math.log(sig(float(x2[i, j]))))
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-6)
    both = first | {(index[i], j) for i, j in chosen}
    assert len(both) == 4 and {tuple(e) for e in method.corrected_entries().tolist()} == both

    # A fresh instance knows nothing until it loads the state; then it reads the corrections.
    fresh = make("ll_cp", targets, observed, delta_rel=10.0)
    fresh.on_epoch_start(0)                                     # epoch 0: no new corrections
    before = float(fresh.training_step(batch, FixedLogits(x2))["loss"].detach())
    fresh.load_state_dict(method.state_dict())
    after = float(fresh.training_step(batch, FixedLogits(x2))["loss"].detach())
    y3 = y.clone()
    for r, j in both:
        y3[index.index(r), j] = 1.0
    assert after == pytest.approx(sum(map(sum, an_losses(x2, y3))) / x2.numel(), rel=1e-6)
    assert before != pytest.approx(after)
    assert {tuple(e) for e in fresh.corrected_entries().tolist()} == both


# ---------------------------------------------------------------------------------------------
# EM + APL
# ---------------------------------------------------------------------------------------------


def run_epoch(method, epoch, targets, observed, logits, batch_size=8):
    """One epoch over a shuffled order, each sample once; returns p as the method stores it."""
    method.on_epoch_start(epoch)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(epoch))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        method.training_step(make_batch(index, targets, observed), FixedLogits(logits[index]))
    method.on_epoch_end(epoch)
    return torch.sigmoid(logits).half()


def test_em_apl_pseudo_negatives_follow_the_schedule():
    n, c, epochs, warmup = 40, 3, 5, 2
    targets, observed = single_positive_labels(n, c)
    method = make("em_apl", targets, observed, epochs=epochs, warmup=warmup)
    unobserved = (~observed).sum(0)
    per_round = [int(0.9 * int(u) / (epochs - warmup)) for u in unobserved]   # per class
    g = torch.Generator().manual_seed(3)
    expected_pseudo = torch.zeros(n, c, dtype=torch.bool)
    expected_soft = torch.zeros(n, c)
    for epoch in range(epochs):
        logits = 4 * torch.randn(n, c, generator=g)
        p = run_epoch(method, epoch, targets, observed, logits)
        if warmup <= epoch + 1 < epochs:                     # rounds after epochs 2, 3, 4 of 5 (1-based)
            for j in range(c):
                free = [i for i in range(n) if not observed[i, j] and not expected_pseudo[i, j]]
                lowest = sorted(free, key=lambda i: float(p[i, j]))[: per_round[j]]
                expected_pseudo[lowest, j] = True
                expected_soft[lowest, j] = p[lowest, j].float()
        assert torch.equal(method.pseudo, expected_pseudo), f"epoch {epoch}"
        assert torch.equal(method.soft.float(), expected_soft), f"epoch {epoch}"
    assert method.pseudo.sum(0).tolist() == [(epochs - warmup) * k for k in per_round]
    assert not (method.pseudo & observed).any()

    fresh = make("em_apl", targets, observed, epochs=epochs, warmup=warmup)
    assert not fresh.pseudo.any()
    fresh.load_state_dict(method.state_dict())
    for name in ("pseudo", "soft", "scores", "unobserved"):
        assert torch.equal(getattr(fresh, name), getattr(method, name)), name


def test_em_apl_warmup_is_clipped_below_the_number_of_epochs():
    n, c = 30, 3
    targets, observed = single_positive_labels(n, c)
    method = make("em_apl", targets, observed, epochs=2)            # default warm-up 5 -> 1
    run_epoch(method, 0, targets, observed, torch.randn(n, c))
    assert method.pseudo.sum(0).tolist() == [int(0.9 * int(u)) for u in (~observed).sum(0)]


def test_em_apl_loss_on_pseudo_negatives():
    n, c = 16, 3
    targets, observed = single_positive_labels(n, c)
    method = make("em_apl", targets, observed, epochs=3, warmup=1, alpha=0.2, beta=0.5)
    g = torch.Generator().manual_seed(5)
    run_epoch(method, 0, targets, observed, 2 * torch.randn(n, c, generator=g))
    method.on_epoch_start(1)
    index = list(range(8))
    x = 2 * torch.randn(8, c, generator=g)
    loss = float(method.training_step(make_batch(index, targets, observed), FixedLogits(x))["loss"].detach())
    pseudo, soft = method.pseudo[index], method.soft[index].float()
    assert pseudo.any() and (~pseudo & ~observed[index]).any()
    total = 0.0
    for i in range(8):
        for j in range(c):
            xi, pi = float(x[i, j]), sig(float(x[i, j]))
            if observed[index[i], j]:
                total += bce(xi, float(targets[index[i], j]))
            elif pseudo[i, j]:
                total += 0.5 * bce(xi, float(soft[i, j]))
            else:
                total += 0.2 * (pi * math.log(pi) + (1 - pi) * math.log(1 - pi))
    assert loss == pytest.approx(total / (8 * c), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# SPLC
# ---------------------------------------------------------------------------------------------


def test_splc_pseudo_labels_from_epoch_one_on():
    targets, observed = single_positive_labels(6, 4)
    method = make("splc", targets, observed)
    index = [0, 1, 2, 3]
    x = torch.full((4, 4), 2.0)                                 # p = 0.88 > tau on unobserved entries
    batch = make_batch(index, targets, observed)
    off = splc(x, targets[index], observed[index], pseudo_label=False)
    on = splc(x, targets[index], observed[index], pseudo_label=True)
    assert float(off) != pytest.approx(float(on))
    method.on_epoch_start(0)
    assert float(method.training_step(batch, FixedLogits(x))["loss"].detach()) == pytest.approx(float(off))
    method.on_epoch_start(1)
    assert float(method.training_step(batch, FixedLogits(x))["loss"].detach()) == pytest.approx(float(on))
    method.on_epoch_start(4)
    assert float(method.training_step(batch, FixedLogits(x))["loss"].detach()) == pytest.approx(float(on))


# ---------------------------------------------------------------------------------------------
# GR
# ---------------------------------------------------------------------------------------------


def test_gr_schedule_follows_the_reference():
    # released train.py, linear_init 0, T = 4, 1-based e: w = w0 + (wT - w0)(e - 1)/T, mu = mu0 + (muT - mu0) e/T
    s = GRSettings()
    first, last = gr_schedule(0, 4, s), gr_schedule(3, 4, s)
    assert first == pytest.approx({"w": 0.0, "b": -2.0, "mu": 0.5 + 0.3 / 4, "sigma": 2.0 - 1.5 / 4})
    assert last == pytest.approx({"w": 1.5, "b": -2.0, "mu": 0.8, "sigma": 0.5})
    moved = gr_schedule(1, 2, GRSettings(b_start=-3.0, b_end=-1.0))
    assert moved["b"] == pytest.approx(-2.0) and moved["mu"] == pytest.approx(0.8)


def test_gr_trains_with_the_scheduled_loss():
    targets, observed = single_positive_labels(6, 4)
    method = make("gr", targets, observed, epochs=4, q2=0.2)
    index = [0, 1, 2, 3]
    x = torch.linspace(-3, 3, 16).view(4, 4)
    batch = make_batch(index, targets, observed)
    for epoch in (0, 2, 3):
        method.on_epoch_start(epoch)
        want = gr(x, targets[index], observed[index], q2=0.2, q3=1.0, **gr_schedule(epoch, 4, method.args))
        got = method.training_step(batch, FixedLogits(x))["loss"]
        assert float(got.detach()) == pytest.approx(float(want))
    assert gr_schedule(0, 4, method.args) != gr_schedule(3, 4, method.args)


@pytest.mark.parametrize("bad", [{"sigma_end": 0.0}, {"q3": -1.0}])
def test_gr_settings_out_of_range(bad):
    targets, observed = single_positive_labels(8, 3)
    with pytest.raises(ValueError, match=f"method.args.{next(iter(bad))}"):
        make("gr", targets, observed, **bad)


# ---------------------------------------------------------------------------------------------
# Resume through the real trainer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["em_apl", "ll_cp"])
def test_resume_mid_epoch_gives_the_same_metrics(method, tmp_path, monkeypatch):
    # 384 / 32 = 12 steps per epoch; em_apl's warm-up is clipped to 2: one round, after epoch 2 of 3.
    # ll_cp with d = 1 %: ceil(32 * 14 * 0.01) = 5 corrections per step from epoch 2 on.
    args = ["method.args.delta_rel=1.0"] if method == "ll_cp" else []
    cfg = tiny_config("optim.epochs=3", "run.checkpoint_every=1", f"method.name={method}",
                      "data.n_val=64", "data.n_test=64", *args)
    reference = train(cfg, tmp_path / "a")
    stop_mid_run(cfg, tmp_path / "b", monkeypatch, at_step=17)   # epoch 2 of 3, step 6 of 12
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["method"]
    if method == "em_apl":                        # half of epoch 2 scored, no round yet
        assert 0 < int(torch.isfinite(state["scores"]).sum()) and not state["pseudo"].any()
    else:                                         # corrections from the first 5 steps of epoch 2
        assert len(state["_extra_state"]["corrected"]) == 5 * math.ceil(32 * 14 * 0.01)
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert resumed["metrics"] == reference["metrics"]
    final = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["method"]
    if method == "em_apl":
        assert final["pseudo"].any()
    else:
        assert len(final["_extra_state"]["corrected"]) == 2 * 12 * math.ceil(32 * 14 * 0.01)


def test_every_new_method_is_registered():
    assert set(STATEFUL) <= set(METHODS.names())
