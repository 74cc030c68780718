"""The adversarial domain branch: gradient reversal, schedule, configuration, every method, resume,
the shortcut scenario's data, and that the branch removes the shortcut's domain information."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mlml.data.pipeline import build_data
from mlml.data.synthetic import SyntheticSource
from mlml.distributed import DistInfo
from mlml.methods import METHODS
from mlml.config import ConfigError
from mlml.methods.domain import (DomainBranch, DomainBranchSettings, dann_lambda, entropy_weights, grad_reverse,
                                 mean_discrepancy, quantile_discrepancy)
from mlml.settings import resolve
from mlml.trainer import Trainer, train
from tests.conftest import stop_mid_run, tiny_config

PER_GROUP = "data.observation=per_group"
SHORTCUT = "data.synthetic.nuisance=collection"


def test_reversal_is_identity_forward_and_negates_scaled_gradient():
    torch.manual_seed(0)
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(4, 5)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.3 * w)
    x.grad = None
    (grad_reverse(x, 0.0) * w).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(w))


def test_dann_schedule_values():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.1) == pytest.approx(2 / (1 + math.exp(-1)) - 1)          # 0.4621
    assert dann_lambda(0.5) == pytest.approx(0.986614, abs=1e-6)
    assert dann_lambda(1.0) == pytest.approx(0.999909, abs=1e-6)
    assert dann_lambda(2.0) == dann_lambda(1.0) and dann_lambda(-1.0) == 0.0         # clamped to [0, 1]
    values = [dann_lambda(p / 20) for p in range(21)]
    assert values == sorted(values)


def test_branch_lambda_follows_its_step_count():
    branch = DomainBranch(DomainBranchSettings(**({"weight": 1.0, "lambda_max": 0.5})), feature_dim=3, num_domains=2, total_steps=10)
    lams = []
    for step in range(11):
        branch.step.fill_(step)                                    # as Method.after_optimizer_step does
        lams.append(branch.lam())
        assert float(branch(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))["domain_lambda"]) == pytest.approx(lams[-1])
    assert lams == pytest.approx([0.5 * dann_lambda(s / 10) for s in range(11)])
    assert int(branch.state_dict()["step"]) == 10
    constant = DomainBranch(DomainBranchSettings(**({"weight": 1.0, "schedule": "constant", "lambda_max": 0.2})), 3, 3, 10)
    assert constant.lam() == 0.2 and isinstance(constant.head, torch.nn.Sequential)
    assert isinstance(DomainBranch(DomainBranchSettings(**({"weight": 1.0, "hidden": 0})), 3, 4, 10).head, torch.nn.Linear)


def test_branch_waits_for_its_start():
    """start = 0.4 of 10 steps: lambda 0 for steps 0-3, then the schedule over the remaining 6 steps."""
    dann = DomainBranch(DomainBranchSettings(weight=1.0, start=0.4), 3, 2, 10)
    constant = DomainBranch(DomainBranchSettings(weight=1.0, start=0.4, schedule="constant", lambda_max=0.3), 3, 2, 10)
    lams, flat = [], []
    for step in range(11):
        dann.step.fill_(step)
        constant.step.fill_(step)
        lams.append(dann.lam())
        flat.append(constant.lam())
    assert lams[:4] == [0.0] * 4 and flat[:4] == [0.0] * 4
    assert lams[4:] == pytest.approx([dann_lambda((s - 4) / 6) for s in range(4, 11)])
    assert flat[4:] == [0.3] * 7
    with pytest.raises(ConfigError, match="'method.domain_branch.start' must be in \\[0, 1\\)"):
        tiny_config("method.domain_branch={weight = 1.0, start = 1.0}")


def test_bad_settings_are_errors_naming_them(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'method.domain_branch.lamda'"):
        tiny_config("method.domain_branch={weight = 1.0, lamda = 1.0}")
    with pytest.raises(ConfigError, match="'method.domain_branch.schedule' must be 'dann' or 'constant', got 'linear'"):
        tiny_config("method.domain_branch={weight = 1.0, schedule = 'linear'}")
    with pytest.raises(ConfigError, match="'method.domain_branch.hidden' must be int"):
        resolve(DomainBranchSettings, {"hidden": 1.5}, "method.domain_branch")
    with pytest.raises(ValueError, match="two domains"):        # single_positive: every image is domain 0
        Trainer(tiny_config("method.domain_branch={weight = 0.1}"), tmp_path, DistInfo())
    with pytest.raises(ValueError, match="collections"):
        build_data(tiny_config(SHORTCUT).data)


def test_branch_is_off_by_default_and_with_weight_zero(tmp_path):
    for extra in ((), ("method.domain_branch={weight = 0.0}",)):
        trainer = Trainer(tiny_config(PER_GROUP, *extra), tmp_path, DistInfo())
        assert trainer.method.domain_branch is None
        assert "domain_loss" not in trainer.train_step(next(iter(trainer.train_loader)))


@pytest.mark.parametrize("method", METHODS.names())
def test_branch_runs_under_every_method(method, tmp_path):
    cfg = tiny_config(f"method.name={method}", *METHODS.get(method).requires, PER_GROUP,
                      "method.domain_branch={weight = 0.5, hidden = 16, schedule = 'constant'}")
    trainer = Trainer(cfg, tmp_path, DistInfo())
    branch = trainer.method.domain_branch
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimised for p in branch.parameters())
    assert len(optimised) == len([p for g in trainer.optimizer.param_groups for p in g["params"]])   # no duplicates
    before = [p.detach().clone() for p in branch.parameters()]
    parts = trainer.train_step(next(iter(trainer.train_loader)))
    assert {"domain_loss", "domain_acc", "domain_lambda"} <= set(parts) and parts["domain_lambda"] == 1.0
    assert all(math.isfinite(v) for v in parts.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, branch.parameters()))
    trainer.method.after_optimizer_step(trainer.model, 1)
    assert int(branch.step) == 1


def test_backbone_gets_the_reversed_domain_gradient(tmp_path):
    """d(loss)/d(backbone) with the branch = task gradient - lambda * weight * domain gradient."""
    cfg = tiny_config(PER_GROUP, "method.domain_branch={weight = 2.0, schedule = 'constant', lambda_max = 0.5}")
    trainer = Trainer(cfg, tmp_path, DistInfo())
    trainer.model.eval()                                           # running BN statistics: same features each call
    batch = next(iter(trainer.train_loader))
    last = list(trainer.model.backbone.parameters())[-1]

    def grad(fn):
        trainer.model.zero_grad()
        trainer.method.zero_grad()
        fn().backward()
        return last.grad.clone()

    task = grad(lambda: trainer.method.objective({"image": trainer.model(batch["image"])}, batch)["loss"])
    both = grad(lambda: trainer.method.training_step(batch, trainer.model)["loss"])
    head = trainer.method.domain_branch.head
    domain = grad(lambda: torch.nn.functional.cross_entropy(head(trainer.model(batch["image"])["features"]), batch["domain"]))
    assert torch.allclose(both, task - 0.5 * 2.0 * domain, atol=1e-6)


def test_resume_with_the_branch_is_exact(tmp_path, monkeypatch):
    cfg = tiny_config(PER_GROUP, "method.domain_branch={weight = 0.5}", "run.checkpoint_every=1")
    reference = train(cfg, tmp_path / "a")
    stop_mid_run(cfg, tmp_path / "b", monkeypatch, at_step=17)
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert resumed["metrics"] == reference["metrics"]


def test_shortcut_scenario_styles_training_images_by_collection():
    cfg = tiny_config(PER_GROUP, SHORTCUT)
    data, plain = build_data(cfg.data), build_data(tiny_config(PER_GROUP).data)
    train_rows, test_rows = data.splits["train"], data.splits["test"]
    # Labels, splits and what is observed are those of the plain per-group scenario.
    rows = np.concatenate([train_rows, test_rows])
    assert np.array_equal(data.labels.dense(rows), plain.labels.dense(rows))
    assert all(np.array_equal(data.splits[s], plain.splits[s]) for s in data.splits)

    def background_hue(rows):        # mean hue of the image border (objects rarely reach it), on the unit circle
        img = torch.stack([data.image(int(r)) for r in rows]).float() / 255
        border = torch.cat([img[:, :, 0], img[:, :, -1]], -1)                   # (N, 3, 2S)
        r, g, b = border.mean(-1).unbind(1)
        return torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)              # radians

    def agreement(rows, domains):     # share of images whose background hue tells their collection
        hue = background_hue(rows)
        guess = (torch.cos(hue - math.radians(160)) < 0).long().numpy()         # style 0: 160°, style 1: 340°
        return float((guess == domains).mean())

    domains = data.observation.domain(train_rows)
    assert agreement(train_rows, domains) > 0.95
    assert np.array_equal(domains, plain.observation.domain(train_rows))
    assert 0.3 < agreement(test_rows, data.observation.domain(test_rows)) < 0.7     # test: unrelated
    # The default data is untouched: no styles unless asked for.
    source = SyntheticSource(cfg.data.settings("synthetic"), len(plain.source), cfg.data.data_seed)
    assert torch.equal(plain.image(int(train_rows[0])), source.image(int(train_rows[0])))
    assert not torch.equal(data.image(int(train_rows[0])), source.image(int(train_rows[0])))


def test_stripes_style_follows_the_collection_in_training_only_and_never_with_random_styles():
    def agreement(data, rows):      # style 0: stripes across x (vertical), style 1: across y (horizontal)
        img = torch.stack([data.image(int(r)) for r in rows]).float().mean(1)      # (N, S, S) grey
        dx = (img[:, :, 1:] - img[:, :, :-1]).abs().mean((1, 2))
        dy = (img[:, 1:] - img[:, :-1]).abs().mean((1, 2))
        return float(((dx < dy).long().numpy() == data.observation.domain(rows)).mean())

    data = build_data(tiny_config(PER_GROUP, SHORTCUT, "data.synthetic.nuisance_style=stripes").data)
    assert agreement(data, data.splits["train"]) > 0.95
    assert 0.3 < agreement(data, data.splits["test"]) < 0.7
    # nuisance = "random" (the shortcut-free reference): the same styled images, training ones unrelated too.
    data = build_data(tiny_config(PER_GROUP, "data.synthetic.nuisance=random", "data.synthetic.nuisance_style=stripes").data)
    assert 0.3 < agreement(data, data.splits["train"]) < 0.7 and 0.3 < agreement(data, data.splits["test"]) < 0.7
    with pytest.raises(ConfigError, match="nuisance = 'random' needs an observation model with collections"):
        build_data(tiny_config("data.synthetic.nuisance=random").data)


def domain_accuracies(trainer: Trainer) -> tuple[float, float]:
    """How well the training domains can be read from the trained model's features.

    Returns (probe, head): the test accuracy of a fresh linear probe (L-BFGS logistic regression on
    standardised features) fitted on one half of the training images and tested on the other half,
    and the accuracy of the run's own domain head on all training images (eval mode, no augmentation).
    """
    rows = trainer.data.splits["train"]
    trainer.model.eval()
    with torch.no_grad():
        features = trainer.model(torch.stack([trainer.data.image(int(r)) for r in rows]))["features"].float()
        head = trainer.method.domain_branch.head(features).argmax(1)
    domain = torch.from_numpy(trainer.data.observation.domain(rows))
    x = (features - features.mean(0)) / (features.std(0) + 1e-6)
    n = len(rows) // 2
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x[:n]), domain[:n]) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((probe(x[n:]).argmax(1) == domain[n:]).float().mean()), float((head == domain).float().mean())


def test_branch_moves_domain_accuracy_towards_chance_on_the_shortcut(tmp_path):
    """Same data, seed and steps; the run without the branch keeps a monitor head (lambda_max = 0:
    the head learns, the backbone gets no gradient from it).

    Measured (seeds 0, 1, 2; 4 epochs): without the branch the probe reads the collection at
    1.00 / 1.00 / 1.00 and the head at 0.997 / 1.00 / 0.997; with the branch (weight 3, head 10x lr,
    constant lambda 1) the probe at 0.745 / 0.807 / 0.812 and the head at 0.549 / 0.737 / 0.706.
    The margins below are about half the smallest measured gaps (0.19 and 0.26), so this cannot
    pass by accident and does not depend on the seed.
    """
    accs = {}
    for name, branch in (("monitor", "{weight = 1.0, lr_scale = 10.0, lambda_max = 0.0}"),
                         ("branch", "{weight = 3.0, lr_scale = 10.0, schedule = 'constant'}")):
        cfg = tiny_config(PER_GROUP, SHORTCUT, "optim.epochs=4", f"method.domain_branch={branch}")
        trainer = Trainer(cfg, tmp_path / name, DistInfo())
        trainer.fit()
        accs[name] = domain_accuracies(trainer)
    (probe_off, head_off), (probe_on, head_on) = accs["monitor"], accs["branch"]
    assert probe_off > 0.95 and head_off > 0.95                     # the shortcut is there to be read
    assert probe_on < probe_off - 0.1
    assert abs(head_on - 0.5) < abs(head_off - 0.5) - 0.15


def test_tensorboard_gets_the_branch_parts(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(PER_GROUP, "optim.epochs=1", "method.domain_branch={weight = 0.1}"), tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/domain_loss", "train/domain_acc", "train/domain_lambda", "train/loss", "val/mAP_macro"} <= tags
    lams = [e.value for e in events.Scalars("train/domain_lambda")]
    assert lams[0] == 0.0 and lams == sorted(lams) and 0 < lams[-1] < 1       # dann: 0 at step 0, rising


def test_labelled_vs_unlabelled_domains_under_the_mean_teacher(tmp_path):
    """labelled_fraction < 1: domain 0 labelled, 1 unlabelled; the teacher's forward is not caught,
    the student's weak + strong forward (2B rows) is, each copy with the batch's domains."""
    cfg = tiny_config("method.teacher={weight = 1.0}", "data.observation_args={labelled_fraction = 0.25}",
                      "data.unlabelled_ratio=3", "method.domain_branch={weight = 0.5, schedule = 'constant'}")
    trainer = Trainer(cfg, tmp_path, DistInfo())
    assert trainer.method.domain_branch.num_domains == 2
    batch = next(iter(trainer.train_loader))
    assert batch["domain"].tolist().count(1) == 24 and torch.equal(batch["domain"] == 0, batch["observed"].any(1))
    seen = []
    head = trainer.method.domain_branch.head
    hook = head.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[0]))
    parts = trainer.train_step(batch)
    hook.remove()
    assert seen == [2 * 32] and math.isfinite(parts["domain_loss"])


def test_mean_discrepancy_is_the_weighted_spread_of_domain_means_and_pulls_them_together():
    torch.manual_seed(0)
    f = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    d = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    mu = f.detach().mean(0)
    expected = sum((d == k).sum() / 12 * ((f.detach()[d == k].mean(0) - mu) ** 2).sum() for k in range(4) if (d == k).any())
    gap = mean_discrepancy(f, d, num_domains=4)                           # domain 3 absent: left out
    assert gap.item() == pytest.approx(float(expected), rel=1e-12) and gap.item() > 0
    gap.backward()
    stepped = (f - 0.5 * f.grad).detach()                                 # a gradient step lowers it
    assert float(mean_discrepancy(stepped, d, 4)) < gap.item()
    same = torch.cat([torch.ones(3, 5), torch.ones(3, 5)]) + torch.tensor([[1.0], [-1.0], [0.0]]).repeat(2, 1)
    assert float(mean_discrepancy(same, torch.tensor([0, 0, 0, 1, 1, 1]), 2)) == 0.0   # equal means, any spread


def test_quantile_discrepancy_is_the_per_dimension_wasserstein_distance_to_the_batch():
    # two domains of 2 values each in one dimension: batch {0, 1, 2, 3}, its quantiles at 1/4 and 3/4
    # (linear interpolation) are 0.75 and 2.25; domain 0 = {0, 1}, domain 1 = {2, 3}
    x = torch.tensor([[0.0], [2.0], [1.0], [3.0]], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([0, 1, 0, 1])
    expected = 0.5 * ((0 - 0.75) ** 2 + (1 - 2.25) ** 2) / 2 + 0.5 * ((2 - 0.75) ** 2 + (3 - 2.25) ** 2) / 2
    gap = quantile_discrepancy(x, d, num_domains=3)                       # domain 2 absent: left out
    assert gap.item() == pytest.approx(expected, rel=1e-6)
    # equal means, different spreads: the mean penalty sees nothing, this one does; same distributions: 0
    spread = torch.tensor([[-1.0], [-3.0], [1.0], [3.0]])
    assert float(mean_discrepancy(spread, d, 2)) == 0.0 < float(quantile_discrepancy(spread, d, 2))
    assert float(quantile_discrepancy(torch.tensor([[1.0, 5.0], [2.0, 4.0], [2.0, 4.0], [1.0, 5.0]]), d, 2)) == pytest.approx(0.0, abs=1e-12)
    torch.manual_seed(0)
    f = torch.randn(40, 3, dtype=torch.float64)
    dom = torch.randint(0, 2, (40,))
    f[dom == 1] = 2 * f[dom == 1] + 1
    f.requires_grad_(True)
    gap = quantile_discrepancy(f, dom, 2)
    assert gap.item() >= mean_discrepancy(f.detach(), dom, 2).item() > 0
    gap.backward()
    assert float(quantile_discrepancy((f - 0.5 * f.grad).detach(), dom, 2)) < gap.item()   # a gradient step lowers it


def test_wasserstein_kind_has_no_head_and_reads_the_scores(tmp_path):
    cfg = tiny_config(PER_GROUP, "method.domain_branch={weight = 10.0, kind = 'wasserstein', input = 'scores'}")
    trainer = Trainer(cfg, tmp_path, DistInfo())
    assert list(trainer.method.domain_branch.parameters()) == []
    parts = trainer.train_step(next(iter(trainer.train_loader)))
    assert {"domain_loss", "domain_lambda"} <= set(parts) and "domain_acc" not in parts and math.isfinite(parts["domain_loss"])
    with pytest.raises(ConfigError, match="'method.domain_branch.entropy' must be false with kind = 'wasserstein'"):
        tiny_config("method.domain_branch={weight = 1.0, kind = 'wasserstein', entropy = true}")


def test_mean_kind_has_no_head_and_trains_the_backbone_towards_equal_domain_means(tmp_path):
    cfg = tiny_config(PER_GROUP, "method.domain_branch={weight = 1.0, kind = 'mean', schedule = 'constant'}")
    trainer = Trainer(cfg, tmp_path, DistInfo())
    branch = trainer.method.domain_branch
    assert list(branch.parameters()) == [] and not hasattr(branch, "head")
    parts = trainer.train_step(next(iter(trainer.train_loader)))
    assert {"domain_loss", "domain_lambda"} <= set(parts) and "domain_acc" not in parts and parts["domain_loss"] > 0
    with pytest.raises(ConfigError, match="'method.domain_branch.kind' must be"):
        tiny_config("method.domain_branch={weight = 1.0, kind = 'coral'}")


def test_scores_input_gives_the_branch_the_predicted_probabilities(tmp_path):
    cfg = tiny_config(PER_GROUP, "method.domain_branch={weight = 1.0, input = 'scores', hidden = 0, schedule = 'constant'}")
    trainer = Trainer(cfg, tmp_path, DistInfo())
    head = trainer.method.domain_branch.head
    assert head.in_features == trainer.data.label_space.num_labels        # C scores, not the D features
    seen = []
    head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    parts = trainer.train_step(next(iter(trainer.train_loader)))
    assert {"domain_loss", "domain_acc"} <= set(parts) and len(seen) == 1
    assert float(seen[0].min()) >= 0 and float(seen[0].max()) <= 1          # sigmoid(logits)
    mean = Trainer(tiny_config(PER_GROUP, "method.domain_branch={weight = 1.0, kind = 'mean', input = 'scores'}"), tmp_path / "m", DistInfo())
    assert math.isfinite(mean.train_step(next(iter(mean.train_loader)))["domain_loss"])


def test_conditional_map_is_the_outer_product_of_features_and_both_sides_of_each_probability():
    torch.manual_seed(0)
    f, p = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    full = DomainBranch(DomainBranchSettings(weight=1.0, kind="conditional"), 3, 2, 10, num_labels=2)
    assert full.head[0].in_features == 3 * 4 and not hasattr(full, "r_f")
    g = torch.cat([p, 1 - p], 1)
    expected = torch.stack([torch.outer(g[i], f[i]).flatten() for i in range(5)])       # g f^T, row-major
    assert torch.allclose(full.multilinear(f, p), expected, atol=1e-12)
    small = DomainBranch(DomainBranchSettings(weight=1.0, kind="conditional", map_dim=2), 3, 2, 10, num_labels=2)
    assert small.head[0].in_features == 2 and tuple(small.r_f.shape) == (3, 2) and tuple(small.r_g.shape) == (4, 2)
    expected = (f @ small.r_f.double()) * (g @ small.r_g.double()) / math.sqrt(2)
    assert torch.allclose(small.multilinear(f, p), expected, atol=1e-12)
    again = DomainBranch(DomainBranchSettings(weight=1.0, kind="conditional", map_dim=2), 3, 2, 10, num_labels=2)
    assert torch.equal(again.r_f, small.r_f) and "r_f" in small.state_dict()            # fixed, carried by checkpoints


def test_conditional_branch_reverses_the_features_and_leaves_the_scores_alone():
    torch.manual_seed(0)
    branch = DomainBranch(DomainBranchSettings(weight=1.0, kind="conditional", schedule="constant", lambda_max=0.5, hidden=0),
                          3, 2, 10, num_labels=2)
    f, p = torch.randn(6, 3, requires_grad=True), torch.rand(6, 2, requires_grad=True)
    d = torch.tensor([0, 1, 0, 1, 0, 1])
    branch(f, d, p)["loss"].backward()
    assert p.grad is None                                              # predictions condition the head, detached
    reversed_grad = f.grad.clone()
    f.grad = None
    head_input = branch.multilinear(f, p.detach())
    torch.nn.functional.cross_entropy(branch.head(head_input), d).backward()
    assert torch.allclose(reversed_grad, -0.5 * f.grad, atol=1e-6)
    assert all(q.grad is not None for q in branch.head.parameters())  # the head itself learns to tell the domains


def test_entropy_weights_favour_confident_images_and_weight_the_domain_loss():
    sure, unsure = torch.tensor([[0.0, 1.0, 0.0]]), torch.full((1, 3), 0.5)
    assert float(entropy_weights(sure)) == pytest.approx(2.0, abs=1e-4)
    assert float(entropy_weights(unsure)) == pytest.approx(1 + math.exp(-math.log(2)), abs=1e-6)
    torch.manual_seed(0)
    plain = DomainBranch(DomainBranchSettings(weight=1.0, hidden=0), 3, 2, 10, num_labels=3)
    weighted = DomainBranch(DomainBranchSettings(weight=1.0, hidden=0, entropy=True), 3, 2, 10, num_labels=3)
    weighted.head.load_state_dict(plain.head.state_dict())
    f, d = torch.randn(2, 3), torch.tensor([0, 1])
    scores = torch.cat([sure, unsure])
    per_image = torch.nn.functional.cross_entropy(plain.head(f), d, reduction="none").detach()
    w = entropy_weights(scores)
    assert weighted(f, d, scores)["loss"].item() == pytest.approx(float((w * per_image).sum() / w.sum()), rel=1e-6)
    assert plain(f, d, scores)["loss"].item() == pytest.approx(float(per_image.mean()), rel=1e-6)


def test_conditional_kind_trains_from_the_config_and_refuses_what_it_cannot_read(tmp_path):
    cfg = tiny_config(PER_GROUP, "method.domain_branch={weight = 1.0, kind = 'conditional', entropy = true, hidden = 8}")
    trainer = Trainer(cfg, tmp_path, DistInfo())
    branch = trainer.method.domain_branch
    width = trainer.method.ctx.feature_dim * 2 * trainer.data.label_space.num_labels
    assert branch.head[0].in_features == (width if width <= 4 * 1024 else 1024)
    parts = trainer.train_step(next(iter(trainer.train_loader)))
    assert {"domain_loss", "domain_acc"} <= set(parts) and math.isfinite(parts["domain_loss"])
    with pytest.raises(ConfigError, match="'method.domain_branch.input' must be 'features' with kind = 'conditional'"):
        tiny_config("method.domain_branch={weight = 1.0, kind = 'conditional', input = 'scores'}")
    with pytest.raises(ConfigError, match="'method.domain_branch.entropy' must be false with kind = 'mean'"):
        tiny_config("method.domain_branch={weight = 1.0, kind = 'mean', entropy = true}")
