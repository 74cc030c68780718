"""`mlml search`: Optuna trials on validation metrics, parallel workers on one SQLite study, pruning, best config."""

import sqlite3
import subprocess
import sys
import time

import pytest

from mlml import cli
from mlml.config import ConfigError
from mlml.search import quotas, read_space

optuna = pytest.importorskip("optuna")

CONFIG = """
[run]
device = "cpu"
[data]
n_train = 384
n_val = 128
n_test = 192
batch_size = 32
observation = "single_positive"
[data.synthetic]
image_size = 16
[model]
width = 8
[optim]
epochs = 3
warmup_epochs = 0.0
[eval]
image_grid = 4
"""

# Two good learning rates first, then two of 1e-9 (the model hardly moves; lr must be > 0): once a
# good trial has finished, the median rule prunes those trials after their first epoch, whichever
# worker runs them.
SPACE = """
[params]
"optim.lr" = {low = 1e-9, high = 1e-2}
[[enqueue]]
"optim.lr" = 5e-3
[[enqueue]]
"optim.lr" = 4e-3
[[enqueue]]
"optim.lr" = 1e-9
[[enqueue]]
"optim.lr" = 1e-9
"""


def test_two_workers_share_one_sqlite_study_prune_and_write_a_best_config_that_trains(tmp_path, capsys):
    (tmp_path / "cfg.toml").write_text(CONFIG)
    (tmp_path / "space.toml").write_text(SPACE)
    out = tmp_path / "out"
    argv = ["search", str(tmp_path / "cfg.toml"), "--space", str(tmp_path / "space.toml"), "--trials", "4",
            "--workers", "2", "--startup-trials", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out.strip()
    study = optuna.load_study(study_name="cfg-space", storage=f"sqlite:///{out / 'study.db'}")
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]                   # N trials, none run twice
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    # Both lr = 1e-9 trials start only after a good trial has finished, so the median rule prunes them
    # after their first epoch. The second good trial may be pruned too when its first epoch falls below
    # the first one's (the median rule working as documented, decided by which worker is faster).
    tiny = [t for t in trials if t.params["optim.lr"] == 1e-9]
    assert len(tiny) == 2 and all(t.state.name == "PRUNED" and t.user_attrs["epochs"] == 1 for t in tiny)
    assert all(t.user_attrs["epochs"] == 1 for t in trials if t.state.name == "PRUNED")
    assert any(t.state.name == "COMPLETE" and t.user_attrs["epochs"] == 3 for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2                    # two processes worked
    assert sorted(p.name for p in out.glob("trial*") if p.is_dir()) == ["trial0", "trial1", "trial2", "trial3"]
    assert all(len(list((out / f"trial{i}").glob("config.toml"))) == 1 for i in range(4))
    assert "| 2 | pruned |" in table or "| 3 | pruned |" in table
    best = study.best_trial
    assert best.params["optim.lr"] > 1e-3 and f"Best: trial {best.number}" in table and (out / "trials.md").read_text().strip() == table
    # The best config is a complete config that `mlml train` takes, with the best trial's value.
    assert f"lr = {best.params['optim.lr']!r}" in (out / "best.toml").read_text()
    assert cli.main(["train", "--config", str(out / "best.toml"), "--set", "optim.epochs=1", "--out", str(tmp_path / "best_run")]) == 0
    assert (tmp_path / "best_run" / "metrics.json").exists()
    capsys.readouterr()
    # A second invocation with the study complete runs nothing and rewrites the same table.
    assert cli.main(argv) == 0 and capsys.readouterr().out.strip() == table
    with sqlite3.connect(out / "study.db") as db:
        assert db.execute("select count(*) from trials").fetchone()[0] == 4


def test_a_stopped_search_stops_its_workers_and_says_so(tmp_path):
    """SIGTERM to `mlml search --workers 2`: each worker's trial in progress stops (the trainer's
    SIGTERM path), no worker outlives the search, and it exits with 75 ("stopped, run again")."""
    import json
    import os
    import signal

    (tmp_path / "cfg.toml").write_text(CONFIG.replace("epochs = 3", "epochs = 500"))     # far longer than the test
    (tmp_path / "space.toml").write_text(SPACE)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mlml", "search", str(tmp_path / "cfg.toml"), "--space", str(tmp_path / "space.toml"),
                             "--trials", "4", "--workers", "2", "--out", str(out)], stderr=subprocess.PIPE, text=True)
    started = lambda: sorted(out.glob("trial*/config.toml"))        # written once a trainer handles SIGTERM
    deadline = time.monotonic() + 120
    while len(started()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(started()) == 2, "two trials did not start"
    workers = [json.loads((c.parent / "run.lock").read_text())["pid"] for c in started()]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "stopped by SIGTERM" in err and "continues the study" in err
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert len(started()) == 2 and not list(out.glob("trial*/metrics.json"))


ASK = """
import sys, time, warnings
import optuna
from mlml.search import storage
warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="s", storage=storage(sys.argv[1]))
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
print(*(study.ask().number for _ in range(3)))
"""


def test_workers_asking_at_once_on_one_sqlite_file_never_get_the_same_trial(tmp_path):
    """SQLite ignores SELECT ... FOR UPDATE: without the claim lock (`mlml.search.storage`) workers
    starting together got the same trial number (this test failed 3 of 3 times), and two search workers
    trained one trial into one `trialN` folder."""
    from mlml.search import storage

    (tmp_path / "ask.py").write_text(ASK)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=storage(url))
    for i in range(9):                              # 9 enqueued, then 9 new: both claim paths
        study.enqueue_trial({"x": i})
    start = time.time() + 8.0                       # every worker has opened the study by then
    workers = [subprocess.Popen([sys.executable, str(tmp_path / "ask.py"), url, str(start)], stdout=subprocess.PIPE, text=True)
               for _ in range(6)]
    numbers = [int(n) for w in workers for n in w.communicate(timeout=120)[0].split()]
    assert all(w.returncode == 0 for w in workers)
    assert sorted(numbers) == list(range(18))
    assert len(study.get_trials()) == 18


def test_space_and_metric_errors_name_the_key(tmp_path, capsys):
    (tmp_path / "cfg.toml").write_text(CONFIG)
    (tmp_path / "space.toml").write_text('[params]\n"optim.lrr" = [1e-3]\n')
    base = ["search", str(tmp_path / "cfg.toml"), "--space", str(tmp_path / "space.toml"), "--trials", "1", "--out", str(tmp_path / "o")]
    assert cli.main(base) == 2 and "optim.lrr" in capsys.readouterr().err
    (tmp_path / "space.toml").write_text('[params]\n"optim.lr" = [1e-3]\n')
    assert cli.main([*base, "--metric", "test/mAP_macro"]) == 2 and "validation metrics only" in capsys.readouterr().err
    (tmp_path / "space.toml").write_text('[params]\n"optim.lr" = {low = 1}\n')
    with pytest.raises(ConfigError, match="optim.lr"):
        read_space(tmp_path / "space.toml")
    assert quotas(5, 2) == [3, 2] and quotas(1, 3) == [1]


def test_a_worker_runs_as_a_submitit_job(tmp_path):
    """`--launcher slurm` hands workers to submitit; its local executor runs one here (one trial)."""
    pytest.importorskip("submitit")
    from mlml.launchers import SlurmLauncher, SlurmResources
    from mlml.search import SearchSpec, search

    (tmp_path / "cfg.toml").write_text(CONFIG.replace("epochs = 3", "epochs = 1"))
    (tmp_path / "space.toml").write_text('[params]\n"optim.lr" = [5e-3]\n')
    out = tmp_path / "out"
    spec = SearchSpec(config=str(tmp_path / "cfg.toml"), overrides=[], space=str(tmp_path / "space.toml"),
                      storage=f"sqlite:///{out / 'study.db'}", study="s", out=str(out), threads=1)
    table = search(spec, 1, launcher=SlurmLauncher(SlurmResources(), poll=0.2, cluster="local"))
    assert "| 0 | complete |" in table and (out / "best.toml").exists()
    (worker,) = (out / "workers").iterdir()
    assert (worker / "done").read_text() == "1\n" and (worker / "slurm" / "job.json").exists()


def test_the_shipped_space_reads_and_its_values_are_config_keys():
    from pathlib import Path

    from mlml.search import SearchSpec, check

    root = Path(__file__).resolve().parent.parent / "experiments"
    spec = SearchSpec(config=str(root / "configs" / "quick.toml"), overrides=[], space=str(root / "search" / "quick.toml"),
                      storage="sqlite://", study="s", out="o")
    space = check(spec)
    assert [p.name for p in space["params"]] == ["optim.lr", "optim.weight_decay", "method.loss"]
    assert space["launcher"]["slurm"]["gpus_per_node"] == 1
