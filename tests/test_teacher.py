"""The EMA teacher (method.teacher, any method): update arithmetic, pseudo-labels, gradients, views,
mixed batches, resume, settings, composition with other methods."""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from mlml.data.dataset import MixedBatchSampler
from mlml.distributed import DistInfo
from mlml.config import ConfigError
from mlml.methods.teacher import (
    adaptive_thresholds,
    align_distribution,
    bce_over_all_entries,
    cap_thresholds,
    ema_decay,
    ema_update,
    pseudo_label_quality,
    observed_prior,
    pseudo_labels,
    sigmoid_rampup,
)
from mlml.trainer import Trainer, train
from tests.conftest import stop_mid_run, tiny_config


def test_ema_decay_warms_up_then_stays():
    assert ema_decay(0, 0.99) == 0.0                  # the first update copies the student
    assert ema_decay(1, 0.99) == pytest.approx(0.5)
    assert ema_decay(9, 0.99) == pytest.approx(0.9)
    assert ema_decay(10_000, 0.99) == 0.99


def test_ema_update_of_parameters_and_buffers():
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    student(torch.randn(8, 3))                        # moves the student's running statistics
    t0 = [p.clone() for p in teacher.parameters()]
    b0 = [b.clone() for b in teacher.buffers()]
    ema_update(teacher, student, 0.9)
    for t, before, s in zip(teacher.parameters(), t0, student.parameters()):
        assert torch.allclose(t, 0.9 * before + 0.1 * s)
    for t, before, s in zip(teacher.buffers(), b0, student.buffers()):
        expected = 0.9 * before + 0.1 * s if before.dtype.is_floating_point else s
        assert torch.allclose(t.float(), expected.float())


def test_rampup():
    assert sigmoid_rampup(0.0) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0.5) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(1.0) == sigmoid_rampup(3.0) == 1.0


def test_pseudo_labels_thresholds_and_observed_entries():
    probs = torch.tensor([[0.95, 0.5, 0.01, 0.99], [0.2, 0.04, 0.8, 0.6]])
    observed = torch.tensor([[False, False, False, True], [False, False, True, False]])
    targets, mask = pseudo_labels(probs, observed, 0.7, 0.05, soft=False)
    assert mask.tolist() == [[True, False, True, False], [False, True, False, False]]
    assert targets.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    soft, soft_mask = pseudo_labels(probs, observed, 0.7, 0.05, soft=True)
    assert torch.equal(soft_mask, mask) and soft[0, 0] == pytest.approx(0.95) and soft[0, 2] == pytest.approx(0.01)
    # Per-class thresholds broadcast over the batch.
    _, m = pseudo_labels(probs, observed, torch.tensor([0.9, 0.9, 0.7, 0.5]), torch.tensor([0.3, 0.0, 0.0, 0.0]), soft=False)
    assert m.tolist() == [[True, False, False, False], [True, False, False, True]]


def test_adaptive_thresholds_keep_the_prior_share():
    probs = torch.linspace(0, 1, 101)[:, None].repeat(1, 2)        # (101, 2): 0.00 .. 1.00
    pos, neg = adaptive_thresholds(probs, torch.tensor([0.2, 0.6]), pos_min=0.5, neg_margin=0.1)
    assert pos.tolist() == pytest.approx([0.8, 0.5])               # top 20%; the second clamps at 0.5
    assert neg.tolist() == pytest.approx([0.7, 0.3])               # lowest 70% and 30%


def test_class_prior_from_observed_positives():
    from mlml.methods.teacher import class_prior

    assert class_prior(torch.tensor([30, 10, 0]), k=2.0).tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert class_prior(torch.tensor([60, 20, 20]), k=1.5).tolist() == pytest.approx([0.9, 0.3, 0.3])
    with pytest.raises(ConfigError, match="method.teacher.k"):
        tiny_config("method.teacher={class_adaptive = true}")


def test_supervised_term_sees_labelled_images_only(tmp_path):
    trainer = _trainer(tmp_path, "method.loss=an")
    trainer.model.eval()                                            # running BN statistics: per-image logits
    batch = next(iter(trainer.train_loader))
    out = trainer.method.training_step(batch, trainer.model)
    batch["observed"][1:] = False                                   # all but the first image unlabelled
    only_first = trainer.method.training_step(batch, trainer.model)
    with torch.no_grad():
        logits = trainer.model(batch["image"][:1])["logits"]
    assert float(only_first["sup"]) != float(out["sup"])
    assert float(only_first["sup"]) == pytest.approx(float(trainer.method.loss(logits, batch["targets"][:1], batch["observed"][:1])), rel=1e-4)


def test_pseudo_label_quality_counts_against_full_labels():
    pseudo = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.tensor([[True, True, True]])
    full = torch.tensor([[1.0, 0.0, 0.0]])
    q = pseudo_label_quality(pseudo, mask, full, torch.zeros(1, 3, dtype=torch.bool))
    assert q["pseudo_pos_precision"] == 0.5 and q["pseudo_pos_recall"] == 1.0
    assert q["pseudo_neg_precision"] == 1.0 and q["pseudo_neg_recall"] == 0.5


def _trainer(tmp_path, *extra):
    return Trainer(tiny_config("method.teacher={weight = 1.0}", *extra), tmp_path, DistInfo())


def test_teacher_gets_no_gradient_and_the_pseudo_term_reaches_the_student(tmp_path):
    trainer = _trainer(tmp_path, "method.loss=masked_bce",
                       "method.teacher={pos_threshold = 0.0, neg_threshold = 0.0, rampup = 0.0}")
    batch = next(iter(trainer.train_loader))
    assert trainer.method.view_names == ["image", "image_strong"] and "image_strong" in batch
    batch["observed"] = torch.zeros_like(batch["observed"])        # no supervised signal: only the pseudo term
    out = trainer.method.training_step(batch, trainer.model)
    assert float(out["sup"]) == 0.0 and float(out["pseudo"]) > 0
    out["loss"].backward()
    grads = [p.grad for p in trainer.model.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in trainer.method.teacher.parameters())
    assert not any(p.requires_grad for p in trainer.method.parameters())
    assert all(id(p) not in {id(q) for g in trainer.optimizer.param_groups for q in g["params"]}
               for p in trainer.method.teacher.parameters())


def test_teacher_follows_the_student_and_is_evaluated_first(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train_step(next(iter(trainer.train_loader)))
    trainer.method.after_optimizer_step(trainer.model, 1)          # first update: decay 0, a copy
    for t, s in zip(trainer.method.teacher.model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(t, s)
    assert list(trainer.method.models_to_evaluate(trainer.model)) == ["teacher", "student"]
    assert not trainer.method.teacher.model.training
    trainer.method.train()
    assert not trainer.method.teacher.model.training


def test_run_reports_teacher_and_student_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config("method.teacher={weight = 1.0}", "optim.epochs=3", "run.checkpoint_every=1")
    reference = train(cfg, tmp_path / "a")
    assert "test/mAP_macro" in reference["metrics"] and "test_student/mAP_macro" in reference["metrics"]
    assert {"val/mAP_macro", "val_student/mAP_macro"} <= set(reference["history"][-1])
    stop_mid_run(cfg, tmp_path / "b", monkeypatch, at_step=17)
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert resumed["metrics"] == reference["metrics"]


@pytest.mark.parametrize("override, message", [
    ("method.teacher={tau = 0.5}", "unknown config key 'method.teacher.tau'"),
    ("method.teacher={targets = 'fuzzy'}", "config key 'method.teacher.targets' must be 'hard' or 'soft', got 'fuzzy'"),
    ("method.teacher={decay = 1.5}", "config key 'method.teacher.decay' must be in [0, 1], got 1.5"),
    ("method.teacher={weight = 'high'}", "method.teacher.weight"),
    ("method.name=mean_teacher", "method.teacher = {"),
    ("method.name=grouped_teacher", "method.name = 'grouped' with method.teacher"),
    ("method.teacher={cap = true}", "config key 'method.teacher.k' must be set (> 0"),
    ("method.teacher={align = true, prior = 'k'}", "config key 'method.teacher.k' must be set (> 0"),
    ("method.teacher={cap = true, class_adaptive = true, k = 1.5}", "config key 'method.teacher.cap' must be false"),
    ("method.teacher={prior = 'guess'}", "config key 'method.teacher.prior' must be 'k' or 'observed'"),
    ("method.teacher={view = 'both'}", "config key 'method.teacher.view' must be 'strong' or 'weak'"),
    ("method.teacher={warmup = 1.0}", "config key 'method.teacher.warmup' must be in [0, 1)"),
    ("method.teacher={pool = 0}", "config key 'method.teacher.pool' must be >= 1"),
    ("method.teacher={pool_scope = 'unobserved'}", "config key 'method.teacher.pool_scope' must be 'images' unless cap or align"),
    ("method.teacher={cap = true, k = 1.5, pool_scope = 'labels'}", "config key 'method.teacher.pool_scope' must be 'images' or 'unobserved'"),
])
def test_bad_settings_are_errors_naming_them(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(override)


@pytest.mark.parametrize("method", ["role", "em_apl", "ll_r", "splc"])
def test_the_teacher_composes_with_any_method(method, tmp_path):
    """role + teacher etc.: the method's own objective on the labelled images, the teacher's
    sigmoid pseudo-labels through the configured loss on the strong view."""
    trainer = _trainer(tmp_path, f"method.name={method}", "method.teacher={rampup = 0.0, pos_threshold = 0.0}")
    batch = next(iter(trainer.train_loader))
    assert "image_strong" in batch and trainer.method.teacher is not None
    parts = trainer.train_step(batch)
    assert {"sup", "pseudo", "weight", "pseudo_pos_count"} <= set(parts) and parts["pseudo"] > 0
    assert parts["loss"] == pytest.approx(parts["sup"] + parts["weight"] * parts["pseudo"], rel=1e-5, abs=1e-6)
    trainer.method.after_optimizer_step(trainer.model, 1)
    assert int(trainer.method.teacher.updates) == 1
    assert list(trainer.method.models_to_evaluate(trainer.model)) == ["teacher", "student"]


def test_mixed_batches_hold_the_ratio_and_resume_anywhere():
    labelled, unlabelled = np.arange(0, 10), np.arange(10, 50)
    s = MixedBatchSampler(labelled, unlabelled, n_labelled=4, n_unlabelled=12, steps=5, seed=3)
    s.set_epoch(2)
    batches = list(s)
    assert len(batches) == len(s) == 5
    for b in batches:
        idx = [k for k, _ in b]
        assert sum(k < 10 for k in idx) == 4 and len(idx) == 16
    # Each stream walks through permutations: 20 labelled draws = the 10 labelled images twice.
    firsts = [k for b in list(s)[:5] for k, _ in b if k < 10]
    assert sorted(firsts) == sorted(list(range(10)) * 2)
    s.set_epoch(2, skip=2 * 16)
    assert list(s) == batches[2:]
    # Two ranks split each global batch between them.
    ranks = [MixedBatchSampler(labelled, unlabelled, 4, 12, 5, 3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    for b, b0, b1 in zip(batches, *ranks):
        assert sorted(b0 + b1) == sorted(b) and len(b0) == len(b1) == 8
    with pytest.raises(ValueError, match="divisible"):
        MixedBatchSampler(labelled, unlabelled, 3, 12, 5, 3, rank=0, world_size=2)


def test_labelled_fraction_with_and_without_unlabelled_images(tmp_path):
    frac = 'data.observation_args={labelled_fraction = 0.25}'
    only = Trainer(tiny_config(frac, "data.unlabelled_ratio=0"), tmp_path / "a", DistInfo())
    mixed = Trainer(tiny_config(frac, "data.unlabelled_ratio=3", "method.teacher={weight = 1.0}"), tmp_path / "b", DistInfo())
    assert len(only.train_loader) == len(mixed.train_loader) == 384 // 32    # same steps per epoch
    b = next(iter(only.train_loader))
    assert bool(b["observed"].any(1).all()) and len(b["index"]) == 32       # labelled images only
    b = next(iter(mixed.train_loader))
    assert int(b["observed"].any(1).sum()) == 8 and int(b["domain"].sum()) == 24
    train(tiny_config(frac, "data.unlabelled_ratio=3", "method.teacher={weight = 1.0}", "optim.epochs=1"), tmp_path / "c")
    added = Trainer(tiny_config(frac, "data.unlabelled_ratio=3", "data.unlabelled_batch=added",
                                "method.teacher={weight = 1.0}"), tmp_path / "d", DistInfo())
    assert len(added.train_loader) == len(only.train_loader)                 # same steps per epoch
    b = next(iter(added.train_loader))                                       # 32 labelled as without the teacher,
    assert int(b["observed"].any(1).sum()) == 32 and int(b["domain"].sum()) == 96 and len(b["index"]) == 128   # + 3 x 32
    with pytest.raises(ConfigError, match="data.unlabelled_batch"):
        tiny_config("data.unlabelled_batch=beside")


def test_strong_view_keeps_colours():
    from mlml.data.transforms import strong

    tf = strong(32)
    for channel in range(3):
        image = torch.full((3, 32, 32), 40, dtype=torch.uint8)
        image[channel, 4:28, 4:28] = 230
        for seed in range(10):
            out = tf(image, seed).float()
            assert torch.equal(out.to(torch.uint8), tf(image, seed).to(torch.uint8))
            assert int(out.mean((1, 2)).argmax()) == channel


# ------------------------------------------------------------------ options added for issue 19 (all off by default)
SEMI = ['data.observation_args={labelled_fraction = 0.25}', "data.unlabelled_ratio=3"]


def test_cap_thresholds_keep_the_class_distribution():
    """Xie et al. (2023): per class, the top floor(prior * n) scores positive, the lowest
    floor((1 - prior) * n) negative (shares scale both), disjoint, every entry labelled at shares 1."""
    torch.manual_seed(0)
    scores = torch.rand(40, 4)                                     # distinct scores
    prior = torch.tensor([0.25, 0.5, 0.0, 1.0])
    pos, neg = cap_thresholds(scores, prior, 1.0, 1.0)
    targets, mask = pseudo_labels(scores, torch.zeros_like(scores, dtype=torch.bool), pos, neg, soft=False)
    assert targets.sum(0).tolist() == [10, 20, 0, 40]              # floor(prior * n) positives
    assert (mask & (targets == 0)).sum(0).tolist() == [30, 20, 40, 0]
    assert bool(mask.all())
    top = scores.topk(10, dim=0).indices[:, 0]
    assert bool(targets[top, 0].all())                             # the positives are the highest scores
    pos, neg = cap_thresholds(scores, prior, 0.5, 0.25)            # the reference code's pos_per / neg_per
    targets, mask = pseudo_labels(scores, torch.zeros_like(mask), pos, neg, soft=False)
    assert targets.sum(0).tolist() == [5, 10, 0, 20]
    assert (mask & (targets == 0)).sum(0).tolist() == [7, 5, 10, 0]


def test_cap_thresholds_over_valid_entries_are_those_of_each_class_s_own_entries():
    torch.manual_seed(1)
    scores, valid = torch.rand(30, 3), torch.rand(30, 3) < 0.4
    valid[:, 2] = False                                             # a class with no entry: no pseudo-label
    prior = torch.tensor([0.3, 0.6, 0.5])
    pos, neg = cap_thresholds(scores, prior, 1.0, 0.5, valid)
    for c in range(2):
        own_pos, own_neg = cap_thresholds(scores[valid[:, c], c:c + 1], prior[c:c + 1], 1.0, 0.5)
        assert (float(pos[c]), float(neg[c])) == (float(own_pos[0]), float(own_neg[0]))
    assert (float(pos[2]), float(neg[2])) == (math.inf, -math.inf)
    assert torch.equal(torch.stack(cap_thresholds(scores, prior, 1.0, 0.5, torch.ones_like(valid))),
                       torch.stack(cap_thresholds(scores, prior, 1.0, 0.5)))


def test_a_pool_of_unobserved_entries_keeps_the_prior_where_each_class_is_missing(tmp_path):
    """Per-group collections: each class's pseudo-labels are for the images of the collections that
    did not label it, and CAP's share is kept among those, not over every image."""
    trainer = _trainer(tmp_path, "data.observation=per_group", "method.loss=masked_bce",
                       "method.teacher={cap = true, prior = 'observed', pool_scope = 'unobserved', rampup = 0.0}")
    teacher = trainer.method.teacher
    batch = next(iter(trainer.train_loader))
    observed = batch["observed"]
    assert bool(observed.any(1).all()) and bool((~observed).any())  # every image labelled, some entries not
    targets, mask = trainer.method.pseudo_labels(teacher(batch["image"]), batch)
    n = (~observed).sum(0)                                           # per class: its unobserved entries
    assert bool(teacher.pool_valid[: len(observed)].eq(~observed).all())
    assert (targets * mask)[~observed].sum() == targets[~observed].sum() and not mask[observed].any()
    expected = torch.floor(teacher.prior.double() * n + 1e-9)
    assert ((targets * ~observed).sum(0)).tolist() == expected.tolist()
    default = _trainer(tmp_path / "d", "data.observation=per_group", "method.loss=masked_bce",
                       "method.teacher={cap = true, prior = 'observed', rampup = 0.0}").method.teacher
    assert "pool_valid" not in default.state_dict()
    trainer.train_step(batch)


def test_observed_prior_is_the_positive_share_of_fully_labelled_images():
    full = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float)
    observed = torch.ones(4, 3, dtype=torch.bool)
    observed[3] = False                                             # an unlabelled image counts for nothing
    labels = lambda rows: (full[rows], observed[rows])
    assert observed_prior(labels, 4).tolist() == pytest.approx([2 / 3, 0.0, 2 / 3])
    assert observed_prior(labels, 4, chunk=3).tolist() == pytest.approx([2 / 3, 0.0, 2 / 3])
    single = lambda rows: (full[rows], full[rows].bool())          # only positives observed
    with pytest.raises(ValueError, match="prior = 'k'"):
        observed_prior(single, 4)


def test_alignment_is_remixmatch_per_class_and_moves_the_marginal_to_the_prior():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.1], [0.3, 0.05]])
    prior, marginal = torch.tensor([0.5, 0.3]), probs.mean(0)
    aligned = align_distribution(probs, prior, marginal)
    r, s = prior / marginal, (1 - prior) / (1 - marginal)
    assert torch.allclose(aligned, probs * r / (probs * r + (1 - probs) * s), atol=1e-5)   # normalised 2-class DA
    assert torch.allclose(align_distribution(probs, marginal, marginal), probs, atol=1e-5)
    assert (aligned.mean(0) - prior).abs().lt((marginal - prior).abs()).all()
    assert torch.equal(aligned.argsort(0), probs.argsort(0))       # the ranking within a class is kept


def test_warmup_and_rampup_decay_schedule(tmp_path):
    trainer = _trainer(tmp_path, "method.teacher={warmup = 0.5, rampup = 0.25, decay = 0.99, rampup_decay = 0.5}")
    teacher = trainer.method.teacher                               # 2 epochs x 12 steps: warm-up 12, ramp-up 6
    assert (teacher.warmup_steps, teacher.rampup_steps) == (12, 6)
    seen = []
    for t in range(24):
        teacher.updates.fill_(t)
        seen.append((teacher.weight(), teacher.decay()))
    assert all(w == 0.0 and d == 0.0 for w, d in seen[:12])         # no pseudo term; the teacher copies the student
    assert seen[12] == (pytest.approx(math.exp(-5)), 0.0)           # the EMA warm-up restarts at the end of it
    assert seen[13][1] == pytest.approx(0.5) and seen[17][1] == pytest.approx(0.5)   # rampup_decay during ramp-up
    assert seen[18] == (1.0, pytest.approx(ema_decay(6, 0.99)))
    default = _trainer(tmp_path / "d").method.teacher              # defaults: the first version's schedule
    default.updates.fill_(5)
    assert default.decay() == ema_decay(5, 0.99) and default.weight() == sigmoid_rampup(5 / round(0.3 * 24))


def test_pool_is_a_ring_of_the_latest_rows(tmp_path):
    teacher = _trainer(tmp_path, "method.teacher={align = true, k = 1.5, pool = 5}").method.teacher
    rows = torch.arange(7 * 14, dtype=torch.float).reshape(7, 14)      # the tiny data have 14 labels
    assert torch.equal(teacher.remember(rows[:3]), rows[:3])
    kept = teacher.remember(rows[3:])
    assert len(kept) == 5 and sorted(kept[:, 0].tolist()) == rows[2:, 0].tolist()
    assert "pool" in teacher.state_dict() and "pool" not in _trainer(tmp_path / "d").method.teacher.state_dict()


def test_cap_labels_the_unlabelled_images_at_the_prior_share(tmp_path):
    trainer = _trainer(tmp_path, *SEMI, "method.teacher={cap = true, k = 1.5, rampup = 0.0}")
    teacher = trainer.method.teacher
    batch = next(iter(trainer.train_loader))
    unlabelled = ~batch["observed"].any(1)
    probs = torch.sigmoid(teacher(batch["image"])["logits"].float())
    targets, mask = trainer.method.pseudo_labels(teacher(batch["image"]), batch)
    n = int(unlabelled.sum())                                       # the pool holds this batch's unlabelled rows
    expected = torch.floor(teacher.prior.double() * n + 1e-9)
    assert targets[unlabelled].sum(0).tolist() == expected.tolist()
    assert bool((mask[unlabelled].sum(0) >= n - 1).all())         # floor + floor: at most one entry left out
    assert int(teacher.pool_filled) == n and torch.allclose(teacher.pool[:n], probs[unlabelled])
    parts = trainer.train_step(batch)
    assert {"pseudo_pos_precision", "pseudo_neg_recall"} <= set(parts)


def test_pseudo_labels_on_unlabelled_images_only_and_weak_student_view(tmp_path):
    trainer = _trainer(tmp_path, *SEMI, "method.teacher={labelled_images = false, view = 'weak', pos_threshold = 0.0}")
    assert trainer.method.view_names == ["image"]
    batch = next(iter(trainer.train_loader))
    assert "image_strong" not in batch
    labelled = batch["observed"].any(1)
    targets, mask = trainer.method.pseudo_labels(trainer.method.teacher(batch["image"]), batch)
    assert not mask[labelled].any() and bool(mask[~labelled].all()) and float(targets[labelled].sum()) == 0
    trainer.train_step(batch)


def test_observed_prior_needs_labelled_negatives(tmp_path):
    with pytest.raises(ValueError, match="prior = 'k'"):
        _trainer(tmp_path, "method.teacher={cap = true, prior = 'observed'}")     # single-positive labels
    trainer = _trainer(tmp_path / "full", "data.observation=full", 'data.observation_args={labelled_fraction = 0.25}',
                       "data.unlabelled_ratio=3", "method.loss=bce", "method.teacher={cap = true, prior = 'observed'}")
    prior = trainer.method.teacher.prior
    positions = np.arange(trainer.method.ctx.num_train)
    labelled = trainer.method.ctx.train_labels(positions)[1].any(1).numpy()
    truth = trainer.data.hidden_labels("train", positions[labelled]).float()
    assert 0 < float(prior.min()) and float(prior.max()) < 1 and 0.2 < labelled.mean() < 0.3
    assert torch.allclose(prior, truth.mean(0))                     # the labelled images' positive frequency
    trainer.train_step(next(iter(trainer.train_loader)))


@pytest.mark.parametrize("scope", ["images", "unobserved"])
def test_new_options_resume_exactly(tmp_path, monkeypatch, scope):
    cfg = tiny_config(*SEMI, f"method.teacher={{cap = true, align = true, k = 1.5, warmup = 0.2, pool = 50, pool_scope = '{scope}'}}",
                      "optim.epochs=2", "run.checkpoint_every=1")
    reference = train(cfg, tmp_path / "a")
    stop_mid_run(cfg, tmp_path / "b", monkeypatch, at_step=17)
    assert train(cfg, tmp_path / "b", resume=True)["metrics"] == reference["metrics"]


def test_sigmoid_rules_are_refused_by_a_method_with_its_own_pseudo_labels():
    with pytest.raises(ConfigError, match="method.teacher.cap applies to sigmoid pseudo-labels"):
        tiny_config("model.head=grouped", "method.name=grouped", "method.teacher={cap = true, k = 1.5}")
    with pytest.raises(ConfigError, match="method.teacher.consistency applies to sigmoid pseudo-labels"):
        tiny_config("model.head=grouped", "method.name=grouped", "method.teacher={consistency = 'bce_all'}")


def test_bce_all_consistency_divides_the_kept_entries_by_every_entry(tmp_path):
    logits, targets = torch.randn(6, 5), (torch.rand(6, 5) > 0.5).float()
    kept = torch.rand(6, 5) > 0.7
    per_entry = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.allclose(bce_over_all_entries(logits, targets, kept), per_entry[kept].sum() / 30)
    assert float(bce_over_all_entries(logits, targets, torch.zeros_like(kept))) == 0.0
    trainer = _trainer(tmp_path, "method.name=role", "method.args={k = 1.5}",
                       "method.teacher={consistency = 'bce_all', view = 'weak', pos_threshold = 0.5, neg_threshold = 0.4}")
    method = trainer.method
    batch = next(iter(trainer.train_loader))
    student = trainer.model(batch["image"])
    targets, mask = method.pseudo_labels(method.teacher(batch["image"]), batch)
    assert 0 < int(mask.sum()) < mask.numel() and not (mask & batch["observed"]).any()
    got = method.pseudo_objective(student, batch, (targets, mask))["loss"]
    expected = nn.functional.binary_cross_entropy_with_logits(student["logits"].float(), targets, reduction="none")
    assert torch.allclose(got, expected[mask].sum() / mask.numel(), atol=1e-6)     # the observed entries are not in it


def test_per_label_pseudo_label_script_reads_a_teacher_run(tmp_path):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "pseudo_labels_per_label", Path(__file__).resolve().parents[1] / "experiments" / "pseudo_labels_per_label.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = tiny_config("method.teacher={weight = 1.0, pos_threshold = 0.6}", "optim.epochs=1",
                      "data.observation_args={labelled_fraction = 0.5}", "data.unlabelled_ratio=1")
    train(cfg, tmp_path / "run")
    text = script.per_label(str(tmp_path / "run"), images=50)
    lines = text.strip().splitlines()
    assert "50 unlabelled training images" in lines[0] and "p >= 0.6" in lines[0] and "p <= 0.05" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == list(cfg_names(cfg))
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in (r[3], r[4], r[6]))


def cfg_names(cfg):
    from mlml.data.pipeline import build_data
    return build_data(cfg.data, cache=("val",)).label_space.names


def test_gain_by_group_script_pairs_seeds_and_averages_each_groups_labels(tmp_path):
    import importlib.util
    import json
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "gain_by_group", Path(__file__).resolve().parents[1] / "experiments" / "gain_by_group.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    runs = tmp_path / "runs"
    rows = {"teacher": ("method.teacher={weight = 1.0}", "data.unlabelled_ratio=1"), "plain": ()}
    for row, extra in rows.items():
        for seed in (0, 1):
            train(tiny_config("optim.epochs=1", f"run.seed={seed}", "data.observation_args={labelled_fraction = 0.5}",
                              *extra), runs / "s" / row / f"seed{seed}")
    (runs / "s" / "plain" / "seed2").mkdir()                      # a seed without metrics.json on one side: left out
    gains = script.group_gains(runs, "s", "teacher", "plain")
    space = script.load_predictor(runs / "s" / "teacher" / "seed0" / "checkpoints" / "best.pt").label_space
    assert list(gains) == [g.name for g in space.groups] + ["all"] and all(len(v) == 2 for v in gains.values())
    for seed in (0, 1):
        a, b = (json.loads((runs / "s" / row / f"seed{seed}" / "metrics.json").read_text())["per_class_ap"] for row in rows)
        a = a["teacher"]
        b = b.get("student", b)
        assert gains["all"][seed] == pytest.approx(sum(a[n] - b[n] for n in space.names) / len(space.names))
        for g in space.groups:                                      # each group's mean over its own labels
            assert gains[g.name][seed] == pytest.approx(sum(a[space.names[i]] - b[space.names[i]] for i in g.labels) / len(g.labels))
    text = script.report(runs, "s", "teacher", "plain")
    assert "teacher - plain" in text and text.count("(2 seeds)") == len(gains)
