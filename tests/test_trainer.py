import json

import pytest
import torch

from mlml.config import load_config
from mlml.metrics import mean_average_precision
from mlml.trainer import lr_factor, train
from tests.conftest import stop_mid_run, tiny_config


def test_tiny_run_beats_chance_and_writes_the_run_directory(tmp_path):
    cfg = tiny_config("method.loss=bce", "data.observation=full", "optim.epochs=4")
    result = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).exists(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert load_config(run / "config.toml") == cfg
    # Chance: random scores on the same test labels, averaged over draws.
    from mlml.data.pipeline import build_data

    data = build_data(cfg.data)
    targets = data.labels.dense(data.splits["test"]).float()
    g = torch.Generator().manual_seed(0)
    chance = sum(float(mean_average_precision(torch.rand(targets.shape, generator=g), targets)) for _ in range(20)) / 20
    assert result["metrics"]["test/mAP_macro"] > chance + 0.1
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["metrics"] == result["metrics"] and saved["seed"] == 0


def test_resume_after_a_stop_mid_epoch_gives_the_same_metrics(tmp_path, monkeypatch):
    cfg = tiny_config("optim.epochs=3", "run.checkpoint_every=1", "model.dropout=0.2")   # dropout: RNG state matters
    reference = train(cfg, tmp_path / "a")
    stop_mid_run(cfg, tmp_path / "b", monkeypatch, at_step=17)   # epoch 2 of 3, step 6 of 12
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 5)
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert resumed["metrics"] == reference["metrics"]
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "b")


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    cfg = tiny_config("optim.lr=1e30", "optim.warmup_epochs=0", "optim.name=sgd")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(cfg, tmp_path / "run")


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0    # an unknown schedule is refused at load (test_config)


def test_the_same_seed_gives_the_same_metrics_on_cpu(tmp_path):
    cfg = tiny_config("run.seed=3")
    first, second = train(cfg, tmp_path / "a"), train(cfg, tmp_path / "b")
    assert first["metrics"] == second["metrics"] and first["history"] == second["history"]
    other = train(tiny_config("run.seed=4"), tmp_path / "c")
    assert other["metrics"] != first["metrics"]
