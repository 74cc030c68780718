"""Distributed training on CPU with gloo and 2 processes (mlml/distributed.py and the trainer under DDP).

One launch of 2 spawned processes (`two_ranks`, tests/ddp_workers.py) trains every registered
method, evaluates, and runs a stopped and an uninterrupted `train()`; the tests compare what the
ranks wrote. One test launches torchrun itself, with a worker that crashes mid-epoch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlml.checkpoint import load_checkpoint
from mlml.data.dataset import EpochSampler, MixedBatchSampler
from mlml.distributed import DistInfo
from mlml.methods import METHODS
from mlml.trainer import Trainer, convert_sync_batchnorm, per_rank_batch, train
from tests.conftest import TINY, tiny_config
from tests.ddp_workers import THREADS, VARIANTS, launch, scenarios

ROOT = Path(__file__).resolve().parent.parent
# 96 training images, global batch 32 in 2 micro-batches per rank: 3 optimiser steps per epoch.
# Odd val/test sizes, so the evaluation sampler pads and the gather must drop duplicates. Dropout,
# so that each rank's random stream matters to an exact resume.
DDP = ["data.n_train=96", "data.n_val=45", "data.n_test=99", "data.batch_size=32", "optim.epochs=2",
       "optim.accumulate=2", "model.dropout=0.2", "run.threads=1", "run.checkpoint_every=1"]
STOP_AT = 4                       # optimiser steps done when the stopped runs stop: epoch 1, step 1
# SIGTERM to one rank during these (optimiser step, rank) of a 4-epoch run (12 steps): 10 stops at random.
_steps = random.Random(16).sample(range(12), 10)
SIGNALS = [(s, random.Random(s).randrange(2)) for s in sorted(_steps)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    launch(scenarios, 2, out, DDP, STOP_AT, SIGNALS)
    return out


def load_ranks(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in range(2)]


def assert_identical(a, b, where: str = "") -> None:
    """Nested dicts / lists of tensors and scalars, exactly equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs across ranks"
    else:
        assert a == b, where


def assert_teacher_identical(states: list[dict]) -> None:
    """A method exposing a `teacher` (an EMA model outside DDP) has the same teacher on every rank."""
    if "teacher" in states[0]:
        for s in states[1:]:
            assert_identical(states[0]["teacher"], s["teacher"], "teacher")


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------


def test_collectives_gather_uneven_sizes_bools_rows_and_row_gradients(two_ranks):
    for r in load_ranks(two_ranks, "collectives"):
        assert r["sizes"].tolist() == [0, 0, 1]
        assert r["flags"].tolist() == [[True, True], [False, True]]
        index, rows = r["rows"]
        assert index.tolist() == [1, 3, 5]
        assert rows[:, 0].tolist() == [1.0, 0.0, 1.0]          # position 1 on both ranks: rank 1 wins
        dense, sparse = r["row_gradient"]                       # ROLE's row-wise reduction = dense all-reduce
        torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-7)
        assert dense.abs().sum() > 0


@pytest.mark.parametrize("method", [*METHODS.names(), *VARIANTS])
def test_state_identical_across_ranks_at_init_and_after_training(two_ranks, method):
    states = load_ranks(two_ranks, method)
    assert states[0]["optimizer"], "no optimiser step was taken"
    for key in ("init", "model", "method", "optimizer"):             # init: seeded, before DDP's broadcast
        assert_identical(states[0][key], states[1][key], key)
    assert_teacher_identical(states)


def test_per_sample_state_was_written_on_both_ranks(two_ranks):
    """The identity above is not vacuous: em_apl chose pseudo-negatives, ll_cp made corrections."""
    em = load_ranks(two_ranks, "em_apl")[0]["method"]
    assert em["pseudo"].any() and int(torch.isfinite(em["scores"].float()).any(dim=1).sum()) == 96   # every row, from both ranks
    corrected = load_ranks(two_ranks, "ll_cp")[0]["method"]["_extra_state"]["corrected"]
    assert len(corrected) > 0


def test_parameters_unused_in_some_steps_need_find_unused_parameters(two_ranks):
    ranks = load_ranks(two_ranks, "unused")
    for r in ranks:
        assert "model.find_unused_parameters = true" in r["without_flag"]["error"]
    for name in ("with_flag", "with_flag_accumulate"):
        assert_identical(ranks[0][name]["model"], ranks[1][name]["model"], name)


def test_a_batch_without_readable_images_on_one_rank_is_skipped_by_all(two_ranks):
    ranks = load_ranks(two_ranks, "unreadable")
    assert [(r["global_step"], r["step_in_epoch"]) for r in ranks] == [(2, 3), (2, 3)]
    assert_identical(ranks[0], ranks[1])


def test_gathered_evaluation_equals_single_process_on_the_same_checkpoint(two_ranks, tmp_path):
    trainer = Trainer(tiny_config(*DDP, "method.name=supervised"), tmp_path, DistInfo())
    trainer.load(two_ranks / "supervised" / "checkpoints" / "last.pt")
    for gathered in load_ranks(two_ranks, "eval"):
        for split in ("val", "test"):
            metrics, scores, targets, _ = trainer.evaluate(split, trainer.model)
            g_metrics, g_scores, g_targets, _ = gathered[split]
            assert g_scores.shape == scores.shape == (45 if split == "val" else 99, scores.shape[1])
            assert torch.equal(g_targets, targets)
            torch.testing.assert_close(g_scores, scores, rtol=0, atol=1e-6)
            assert g_metrics == pytest.approx(metrics, abs=1e-6)


def test_only_rank_0_writes_the_run_directory(two_ranks):
    run = two_ranks / "reference"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("events.out.tfevents")]
    assert len(events) == 1, files                                  # one TensorBoard writer
    assert sorted(set(files) - set(events)) == ["checkpoints/best.pt", "checkpoints/last.prev.pt", "checkpoints/last.pt",
                                                "config.toml", "metrics.json"]


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_and_resume_is_exact(two_ranks):
    """10 SIGTERMs, each to one rank only: both ranks agree (all-reduced flag) on the step, write one
    last.pt, and the resumed runs end with the metrics of the uninterrupted run."""
    seen = [torch.load(two_ranks / f"preempted.rank{r}.pt", weights_only=True)["seen"] for r in range(2)]
    assert seen[0] == seen[1] == [s + 1 for s, _ in SIGNALS]
    assert {r for _, r in SIGNALS} == {0, 1}
    preempted = json.loads((two_ranks / "preempted" / "metrics.json").read_text())
    reference = json.loads((two_ranks / "preempt_reference" / "metrics.json").read_text())
    assert preempted["metrics"] == reference["metrics"] and preempted["history"] == reference["history"]


def test_resume_at_world_size_1_of_a_world_size_2_checkpoint(two_ranks, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_ranks / "stopped", run)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (ckpt["world_size"], ckpt["global_step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (2, STOP_AT, 1, 1)
    result = train(tiny_config(*DDP), run, resume=True)
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (final["world_size"], final["global_step"], final["epoch"]) == (1, 6, 2)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert 0 < result["metrics"]["test/mAP_macro"] <= 1


def test_torchrun_restarts_a_crashed_worker_group_from_the_last_checkpoint(two_ranks, tmp_path):
    """Rank 1 dies mid-epoch; torchrun --max-restarts=1 relaunches both ranks, which resume from
    last.pt (no --resume needed) and finish with the metrics of the uninterrupted run."""
    run = tmp_path / "run"
    sets = [a for o in (*TINY, *DDP) for a in ("--set", o)]
    env = {**os.environ, **THREADS, "MLML_TEST_DIE_AT_STEP": str(STOP_AT),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "--monitor-interval=0.2", "-m", "tests.ddp_workers", "train", *sets, "--out", str(run)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(exitcode: 17)" in proc.stderr, "no worker died: the restart was not exercised"
    restarted = json.loads((run / "metrics.json").read_text())
    reference = json.loads((two_ranks / "reference" / "metrics.json").read_text())
    assert restarted["metrics"] == reference["metrics"]
    assert restarted["history"] == reference["history"]


# ---------------------------------------------------------------------------------------------
# One process: the arithmetic the distributed runs rely on
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [96, 101])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_a_step_sees_the_same_global_batch_at_any_world_size(world_size, n):
    """Rank r's k-th batch of B / W items: their union is the single-process k-th batch, also after
    a resume that skips `step * B / W` items per rank (the trainer's skip arithmetic), and every
    world size takes n // B steps per epoch."""
    batch, epoch = 16, 3
    single = EpochSampler(n, shuffle=True, seed=5, global_batch=batch)
    single.set_epoch(epoch)
    order = [k for k, _ in single]
    per_rank = batch // world_size
    for skip_steps in (0, 2):
        shards = []
        for r in range(world_size):
            s = EpochSampler(n, shuffle=True, seed=5, rank=r, world_size=world_size, global_batch=batch)
            s.set_epoch(epoch, skip=skip_steps * per_rank)
            shards.append([k for k, _ in s])
            assert len(s) == len(shards[-1]) == (n // batch - skip_steps) * per_rank
        for step in range(skip_steps, n // batch):
            got = sorted(k for sh in shards for k in sh[(step - skip_steps) * per_rank : (step - skip_steps + 1) * per_rank])
            assert got == sorted(order[step * batch : (step + 1) * batch])


@pytest.mark.parametrize("world_size", [2, 4])
def test_mixed_labelled_unlabelled_batches_are_the_same_at_any_world_size(world_size):
    labelled, unlabelled = np.arange(0, 40), np.arange(40, 100)
    def union(ws, step):
        return sorted(k for r in range(ws) for k in MixedBatchSampler(labelled, unlabelled, 8, 8, 5, 3, r, ws).batch(step))
    for step in (0, 4, 7):
        assert union(world_size, step) == union(1, step)


def test_batch_size_must_divide_over_ranks_and_micro_batches():
    assert per_rank_batch(32, 2, 2) == 16
    with pytest.raises(ValueError, match="divisible by world size x optim.accumulate = 4 x 3"):
        per_rank_batch(32, 4, 3)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path):
    """With BatchNorm in eval mode (per-sample computation), 4 micro-batches = one batch."""
    grads = []
    for k in (1, 4):
        trainer = Trainer(tiny_config("optim.accumulate=" + str(k)), tmp_path / str(k), DistInfo())
        trainer.model.eval()
        trainer.train_loader.sampler.set_epoch(0)
        parts = trainer.train_step(next(iter(trainer.train_loader)))
        grads.append(([p.grad.clone() for p in trainer.model.parameters()], parts["loss"]))
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-5)


def test_sync_bn_converts_batchnorm_and_refuses_cpu_processes(tmp_path):
    trainer = Trainer(tiny_config("model.sync_bn=true"), tmp_path, DistInfo())
    kinds = {type(m).__name__ for m in trainer.model.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds
    with pytest.raises(ValueError, match="SyncBatchNorm does not run on CPU"):
        convert_sync_batchnorm(trainer.model, torch.device("cpu"), DistInfo(0, 2, 0))
