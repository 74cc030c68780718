"""The grouped method: one CPU step on conditional-group data, the loss equals its parts, clear errors."""

from __future__ import annotations

import pytest
import torch

from mlml.config import ConfigError

from mlml.distributed import DistInfo
from mlml.groups import group_cross_entropy, group_targets
from mlml.trainer import Trainer
from tests.conftest import tiny_config

PATTERN_DATA = ["data.synthetic.min_objects=1", "data.synthetic.max_objects=1", "data.synthetic.num_patterns=3"]


@pytest.mark.parametrize("observation", ["single_positive", "per_group"])
@pytest.mark.parametrize("unknown", [True, False])
def test_one_step_on_pattern_data(observation, unknown, tmp_path):
    extra = [] if unknown else ["data.groups={pattern = {has_unknown = false}}"]
    cfg = tiny_config("method.name=grouped", "model.head=grouped", f"data.observation={observation}", *PATTERN_DATA, *extra)
    trainer = Trainer(cfg, tmp_path, DistInfo())
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        out = trainer.model(batch["image"])
        ce = group_cross_entropy(out["group_logits"], group_targets(batch["targets"], batch["observed"], trainer.data.label_space))
        parts = trainer.method.training_step(batch, trainer.model)
    assert set(ce) == {"colour", "object", "pattern"} and "sigmoid" not in parts
    assert out["group_logits"]["pattern"].shape[1] == 3 + unknown
    assert torch.allclose(parts["loss"], sum(ce.values()))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert torch.isfinite(torch.tensor(trainer.train_step(batch)["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_non_exclusive_groups_use_the_sigmoid_loss(tmp_path):
    trainer = Trainer(tiny_config("method.name=grouped", "model.head=grouped", "method.loss=an"), tmp_path, DistInfo())
    parts = trainer.train_step(next(iter(trainer.train_loader)))   # default data: 1-3 objects, no exclusive group
    assert parts["loss"] == pytest.approx(parts["sigmoid"]) and not any(k.startswith("ce/") for k in parts)


def test_needs_the_grouped_head(tmp_path):
    trainer = Trainer(tiny_config("method.name=grouped", *PATTERN_DATA), tmp_path, DistInfo())
    with pytest.raises(ValueError, match="model.head = 'grouped'"):
        trainer.train_step(next(iter(trainer.train_loader)))


def _teacher_trainer(tmp_path, *extra):
    cfg = tiny_config("method.name=grouped", "method.teacher={weight = 1.0}", "model.head=grouped", "data.observation=single_positive", *PATTERN_DATA, *extra)
    return Trainer(cfg, tmp_path, DistInfo())


def test_teacher_pseudo_labels_reach_the_student_only(tmp_path):
    trainer = _teacher_trainer(tmp_path, "method.teacher={threshold = 0.0, rampup = 0.0}")
    batch = next(iter(trainer.train_loader))
    assert "image_strong" in batch
    batch["observed"] = torch.zeros_like(batch["observed"])        # nothing observed: only the pseudo term
    out = trainer.method.training_step(batch, trainer.model)
    assert float(out["sup"]) == 0.0 and float(out["pseudo"]) > 0
    assert all(float(out[f"pseudo_rate/{g}"]) == 1.0 for g in ("colour", "object", "pattern"))
    out["loss"].backward()
    assert sum(float(p.grad.abs().sum()) for p in trainer.model.parameters()) > 0
    assert all(p.grad is None and not p.requires_grad for p in trainer.method.teacher.parameters())


def test_teacher_is_evaluated_first_and_followed(tmp_path):
    trainer = _teacher_trainer(tmp_path)
    trainer.train_step(next(iter(trainer.train_loader)))
    trainer.method.after_optimizer_step(trainer.model, 1)          # first update: a copy
    for t, s in zip(trainer.method.teacher.model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(t, s)
    assert list(trainer.method.models_to_evaluate(trainer.model)) == ["teacher", "student"]
    with pytest.raises(ConfigError, match="unknown config key 'method.teacher.tau'"):
        _teacher_trainer(tmp_path / "x", "method.teacher={tau = 0.5}")
