"""Every registered method takes one CPU training step with every compatible loss."""

import pytest
import torch

from mlml.losses import LOSSES
from mlml.methods import METHODS
from mlml.trainer import Trainer
from tests.conftest import tiny_config


@pytest.mark.parametrize("method", METHODS.names())
def test_one_step_through_the_registry(method, tmp_path):
    cfg = tiny_config(f"method.name={method}", *METHODS.get(method).requires)
    trainer = Trainer(cfg, tmp_path, info=__import__("mlml.distributed", fromlist=["DistInfo"]).DistInfo())
    batch = next(iter(trainer.train_loader))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    parts = trainer.train_step(batch)
    assert "loss" in parts and all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("loss", LOSSES.names())
def test_supervised_step_with_every_loss(loss, tmp_path):
    from mlml.distributed import DistInfo

    trainer = Trainer(tiny_config(f"method.loss={loss}"), tmp_path, DistInfo())
    parts = trainer.train_step(next(iter(trainer.train_loader)))
    assert torch.isfinite(torch.tensor(parts["loss"]))


def test_pos_weight_observed(tmp_path):
    from mlml.distributed import DistInfo

    trainer = Trainer(tiny_config("method.pos_weight=observed"), tmp_path, DistInfo())
    assert torch.isfinite(torch.tensor(trainer.train_step(next(iter(trainer.train_loader)))["loss"]))


WITH_TEACHER = ["method.teacher={rampup = 0.0, pos_threshold = 0.3, threshold = 0.3}"]


@pytest.mark.parametrize("method, extra", [(m, []) for m in METHODS.names()]
                         + [(m, WITH_TEACHER) for m in ("supervised", "grouped", "role")]
                         + [("ll_r", ["model.boostlu=5.0"])])
def test_scrambled_answer_key_changes_no_loss_or_gradient(method, extra, tmp_path):
    """The hidden ground truth reaches a method only through its diagnostics channel, never its loss."""
    from mlml.distributed import DistInfo

    cfg = tiny_config(f"method.name={method}", *METHODS.get(method).requires, *extra)
    asked: list[int] = []

    def scrambled(split, positions):
        asked.append(len(positions))
        g = torch.Generator().manual_seed(len(asked))
        return torch.rand(len(positions), trainer.data.label_space.num_labels, generator=g) < 0.5

    results = []
    for scramble in (False, True):
        trainer = Trainer(cfg, tmp_path / str(scramble), DistInfo())
        if scramble:
            trainer.data.hidden_labels = scrambled
        batch = next(iter(trainer.train_loader))
        assert "full_targets" not in batch
        parts = trainer.train_step(batch)
        results.append((parts["loss"], [p.detach().clone() for p in trainer.model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    if extra == WITH_TEACHER:
        assert asked, "the diagnostics channel was not used, so the scramble tested nothing"
