import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlml.checkpoint import CheckpointError, first_non_finite, load_checkpoint, save_checkpoint
from mlml.cli import main
from mlml.config import load_config
from mlml.files import LockedError
from mlml.metrics import mean_average_precision
from mlml.trainer import PREEMPTED_EXIT_CODE, ConfigChangedError, Preempted, Trainer, lr_factor, train
from tests.conftest import TINY, stop_mid_run, tiny_config


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


def test_amp_on_a_cpu_trains_in_bf16_only_when_asked(tmp_path, monkeypatch):
    from mlml.models.backbones import SmallCNN
    from mlml.trainer import amp_dtype_for

    cpu = torch.device("cpu")
    assert amp_dtype_for(tiny_config(), cpu) is None and amp_dtype_for(tiny_config("optim.amp=off"), cpu) is None
    assert amp_dtype_for(tiny_config("optim.amp=on"), cpu) == torch.bfloat16
    seen = []
    original = SmallCNN.forward
    monkeypatch.setattr(SmallCNN, "forward", lambda self, x: seen.append(self.features[0](x).dtype) or original(self, x))
    cfg = tiny_config("method.loss=bce", "data.observation=full", "optim.epochs=4", "optim.amp=on")
    result = train(cfg, tmp_path / "bf16")
    assert torch.bfloat16 in seen                      # the convolutions ran in bf16 (training and evaluation)
    reference = train(tiny_config("method.loss=bce", "data.observation=full", "optim.epochs=4"), tmp_path / "fp32")
    assert result["metrics"] != reference["metrics"]  # another precision: not the fp32 run
    assert abs(result["metrics"]["test/mAP_macro"] - reference["metrics"]["test/mAP_macro"]) < 0.05, (result, reference)


def test_resume_after_a_stop_mid_epoch_gives_the_same_metrics(tmp_path, monkeypatch):
    cfg = tiny_config("optim.epochs=3", "run.checkpoint_every=1", "model.dropout=0.2")   # dropout: RNG state matters
    reference = train(cfg, tmp_path / "a")
    stop_mid_run(cfg, tmp_path / "b", monkeypatch, at_step=17)   # epoch 2 of 3, step 6 of 12
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 5)
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert resumed["metrics"] == reference["metrics"]
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "b")


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    cfg = tiny_config("optim.lr=1e30", "optim.warmup_epochs=0", "optim.name=sgd")
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at epoch 1, step 2 \(parts: \{'loss': nan\}\); lower optim.lr"):
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


# ---------------------------------------------------------------------------------------------
# Reliability: preemption, crashes during writes, resume rules, the run directory (docs/reliability.md)
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
RELIABLE = ("optim.epochs=4", "model.dropout=0.2")          # dropout: the RNG state matters to an exact resume


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run of RELIABLE and its result."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("reference") / "run"
    return run, train(tiny_config(*RELIABLE), run)


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def train_args(run: Path, *extra: str) -> list[str]:
    return ["train", *[a for o in (*TINY, *RELIABLE, "run.threads=1", *extra) for a in ("--set", o)], "--out", str(run)]


def test_sigterm_or_sigusr1_at_10_random_steps_then_resume_gives_the_metrics_of_an_uninterrupted_run(reference, tmp_path, monkeypatch):
    """Each SIGTERM arrives during a step; the step finishes, last.pt is written, Preempted is raised."""
    original = Trainer.train_step
    stops = sorted(random.Random(16).sample(range(0, 47), 10))         # 4 epochs x 12 steps; some at epoch ends
    pending = list(stops)

    def signalled(self, batch):
        if pending and self.global_step == pending[0]:
            pending.pop(0)                                               # SIGTERM, or SIGUSR1 every third time
            signal.raise_signal(signal.SIGUSR1 if len(pending) % 3 == 0 else signal.SIGTERM)   # the step still ends
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    run, cfg, seen = tmp_path / "run", tiny_config(*RELIABLE), []
    while True:
        try:
            result = train(cfg, run, resume=True)
            break
        except Preempted as stop:
            assert stop.signum == (signal.SIGUSR1 if len(pending) % 3 == 0 else signal.SIGTERM)
            assert stop.path == run / "checkpoints" / "last.pt"
            ckpt = load_checkpoint(stop.path)
            assert ckpt["global_step"] == stop.step
            seen.append(stop.step)
    assert seen == [s + 1 for s in stops]
    assert result["metrics"] == reference[1]["metrics"] and result["history"] == reference[1]["history"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL             # the handlers are removed after training
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_sigterm_to_a_training_process_exits_75_with_last_pt_and_resume_is_exact(reference, tmp_path):
    for attempt in range(4):          # a run that finished before the signal came (an idle, fast machine) is retried sooner
        run = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "mlml", *train_args(run)], cwd=ROOT, env=subprocess_env(),
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (run / "config.toml").exists():                       # training starts right after it is written
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.5) / 4**attempt)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
        if not (run / "metrics.json").exists():   # finished before the signal (exit 0, or -15 on the way out): retry
            break
    assert proc.returncode == PREEMPTED_EXIT_CODE == 75, err[-3000:]
    assert "stopped by SIGTERM after optimiser step" in err and "--resume" in err
    assert not (run / "run.lock").exists() and not (run / "metrics.json").exists()
    resumed = train(tiny_config(*RELIABLE), run, resume=True)
    assert resumed["metrics"] == reference[1]["metrics"]


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_is_exact(reference, tmp_path):
    """The child stalls halfway through writing its k-th checkpoint (k at random) and is killed there."""
    run, marker = tmp_path / "run", tmp_path / "writing"
    k = random.Random(7).randrange(5, 45)
    child = (
        "import os, sys, time\n"
        "import mlml.files as c\n"
        "count, original = [0], c._write_all\n"
        "def stall(fd, data):\n"
        "    count[0] += 1\n"
        f"    if count[0] == {k}:\n"
        "        os.write(fd, bytes(data[: len(data) // 2])); os.fsync(fd)\n"
        f"        open({str(marker)!r}, 'w').close(); time.sleep(300)\n"
        "    original(fd, data)\n"
        "c._write_all = stall\n"
        "from mlml.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, *train_args(run, "run.checkpoint_every=1")], cwd=ROOT,
                            env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.02)
    proc.kill()                                                          # SIGKILL, mid-write
    proc.wait()
    partial = list((run / "checkpoints").glob(".*.tmp"))
    assert len(partial) == 1                                            # the half-written file, under a temporary name
    with pytest.raises(CheckpointError):
        load_checkpoint(partial[0])
    load_checkpoint(run / "checkpoints" / "last.pt")                     # the previous checkpoint is complete
    assert json.loads((run / "run.lock").read_text())["pid"] == proc.pid   # left behind by the killed process
    resumed = train(tiny_config(*RELIABLE), run, resume=True)           # takes over the dead process's lock
    assert resumed["metrics"] == reference[1]["metrics"] and resumed["history"] == reference[1]["history"]


def test_train_seconds_sum_over_resumes(tmp_path, monkeypatch):
    cfg = tiny_config("run.checkpoint_every=1")
    stop_mid_run(cfg, tmp_path / "run", monkeypatch, at_step=17)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["train_seconds"] > 0
    save_checkpoint({**ckpt, "train_seconds": 1000.0}, last)            # as if the first part had trained 1000 s
    start = time.perf_counter()
    resumed = train(cfg, tmp_path / "run", resume=True)
    assert 1000.0 < resumed["train_seconds"] < 1000.0 + time.perf_counter() - start


def test_time_based_checkpoints(tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 20))                                     # 20 s pass between two looks at the clock
    monkeypatch.setattr("mlml.trainer.time.monotonic", lambda: float(next(clock)))
    cfg = tiny_config("run.checkpoint_minutes=1")
    stop_mid_run(cfg, tmp_path / "run", monkeypatch, at_step=17)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 15)              # every 3rd step boundary: 60 s, so steps 3, 6, ... 15


def test_resume_under_another_config_is_refused_naming_the_keys_unless_allowed(reference, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(*RELIABLE, "run.checkpoint_every=1")
    stop_mid_run(cfg, tmp_path / "run", monkeypatch, at_step=17)
    before = snapshot(tmp_path / "run")
    edited = tiny_config(*RELIABLE, "method.loss=asl", "optim.lr=0.001", "run.checkpoint_every=3")
    with pytest.raises(ConfigChangedError, match=r"last.pt was written by another config: method.loss = 'an' in the "
                       r"checkpoint, 'asl' now; optim.lr = 0.005 in the checkpoint, 0.001 now\. .*--allow-config-change"):
        train(edited, tmp_path / "run", resume=True)
    assert snapshot(tmp_path / "run") == before                          # not even config.toml was touched
    sets = [a for o in (*TINY, *RELIABLE, "method.loss=asl") for a in ("--set", o)]
    assert main(["train", *sets, "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "method.loss = 'an' in the checkpoint, 'asl' now" in capsys.readouterr().err
    resumed = train(tiny_config(*RELIABLE, "run.checkpoint_every=3"), tmp_path / "run", resume=True)   # execution keys may change
    assert resumed["metrics"] == reference[1]["metrics"]
    changed = train(edited, tmp_path / "run", resume=True, allow_config_change=True)
    assert "resuming" in capsys.readouterr().err and load_config(tmp_path / "run" / "config.toml") == edited
    assert changed["metrics"]["test/mAP_macro"] > 0


def test_a_refused_second_run_leaves_the_first_runs_files_byte_identical(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    before = snapshot(run)
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        train(tiny_config("optim.lr=0.1"), run)
    assert snapshot(run) == before
    (run / "checkpoints" / "last.pt").unlink()
    (run / "checkpoints" / "last.prev.pt").unlink()
    with pytest.raises(FileExistsError, match="already holds a run"):     # metrics.json alone still marks a run
        train(tiny_config("optim.lr=0.1"), run)


def test_a_second_process_on_one_run_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mlml.files import FileLock; "
                               "FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(run / "run.lock")], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"run directory {run} is in use by process {holder.pid} on this host"):
            train(tiny_config("optim.epochs=1"), run)
        assert [p.name for p in run.iterdir()] == ["run.lock"]          # nothing else written
    finally:
        holder.kill()
        holder.wait()
    train(tiny_config("optim.epochs=1"), run)                            # its owner died: the lock is taken over
    assert not (run / "run.lock").exists() and (run / "metrics.json").exists()


def test_a_diverging_run_leaves_only_finite_checkpoints(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"not writing .*last.pt: 'model\..*' has non-finite values at epoch 1"):
        train(tiny_config("optim.lr=1e4", "optim.warmup_epochs=0", "optim.name=sgd", "run.checkpoint_every=1"), run)
    written = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert written == ["last.prev.pt", "last.pt"]
    for name in written:
        ckpt = load_checkpoint(run / "checkpoints" / name)
        assert first_non_finite({"model": ckpt["model"], "optimizer": ckpt["optimizer"]["state"]}) is None
    assert not (run / "run.lock").exists()
