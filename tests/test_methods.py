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
