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
    ema_decay,
    ema_update,
    pseudo_label_quality,
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
