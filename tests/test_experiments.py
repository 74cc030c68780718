import json
import os
import sys

import pytest

from mlml import experiments
from mlml.cli import main
from mlml.config import ConfigError
from mlml.experiments import expand, list_tables, read_table, reproduce, run_config, run_dir, table_from_runs, train_command
from tests.conftest import TINY, stop_mid_run


@pytest.fixture
def table(tmp_path):
    tiny = "\n".join(f'"{o}",' for o in TINY)
    (tmp_path / "tiny.toml").write_text(f"""
title = "tiny"
metrics = ["test/mAP_macro"]
[profiles.quick]
config = "base.toml"
seeds = 2
[settings]
sp = [{tiny} "data.observation=single_positive"]
[methods]
an = ["method.loss=an"]
full = ["method.loss=bce", "data.observation=full"]
""")
    (tmp_path / "base.toml").write_text("[optim]\nweight_decay = 1e-4\n")
    return tmp_path / "tiny.toml"


def test_expand(table, tmp_path):
    runs = expand(read_table(str(table)), "quick", None, tmp_path / "runs")
    assert [(r.method, r.seed) for r in runs] == [("an", 0), ("an", 1), ("full", 0), ("full", 1)]


def test_reproduce_twice_trains_nothing_the_second_time_and_gives_the_same_table(table, tmp_path, capsys, monkeypatch):
    runs, results = tmp_path / "runs", tmp_path / "results"
    first = reproduce(str(table), "quick", runs_dir=runs, results_dir=results)
    assert "4 to run" in capsys.readouterr().err
    mtimes = {p: p.stat().st_mtime for p in runs.rglob("metrics.json")}
    timing = json.loads((results / "tiny.timing.json").read_text())["quick"]
    assert timing["runs"] == 4 and timing["seeds"] == 2 and timing["train_seconds"] > 0 and timing["jobs"] == 1 and "CPU cores" in timing["hardware"]

    def no_training(*args):
        raise AssertionError("the second reproduction trained a run")

    monkeypatch.setattr(experiments, "launch", no_training)
    second = reproduce(str(table), "quick", runs_dir=runs, results_dir=results)
    assert "0 to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime for p in runs.rglob("metrics.json")} == mtimes
    assert first == second == (results / "tiny.md").read_text()
    recorded = [json.loads(p.read_text()) for p in sorted(runs.rglob("metrics.json"))]
    assert len({r["split_hash"] for r in recorded}) == 1 and len({r["config_hash"] for r in recorded}) == 4
    assert all(r["provenance"]["packages"]["torch"] and r["config"]["run"]["seed"] == r["seed"] for r in recorded)
    assert "| an |" in first and "Training time: 4 runs" in first and (results / "tiny.csv").exists()
    assert len(list((runs / "tiny").glob("events.out.tfevents.*"))) == 1     # the custom-scalars layout
    rebuilt = table_from_runs(runs / "tiny")                                  # `mlml table runs/tiny`
    assert rebuilt.split("| method |")[1] == first.split("| method |")[1]
    assert len(list((runs / "tiny").glob("events.out.tfevents.*"))) == 1
    # A finished run of another config (as another profile's would be) is not reused.
    (tmp_path / "base.toml").write_text("[optim]\nweight_decay = 0.0\n")
    with pytest.raises(ConfigError, match="optim.weight_decay = 0.0001, wanted 0.0"):
        reproduce(str(table), "quick", runs_dir=runs, results_dir=results)


def test_seeds_option_reproduces_a_subset(table, tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(experiments, "launch", lambda run, threads, torchrun: launched.append((run.method, run.seed, torchrun)))
    monkeypatch.setattr(experiments, "record_timing", lambda *args: None)
    with pytest.raises(FileNotFoundError):        # nothing really trained, so no metrics.json to read
        reproduce(str(table), "quick", seeds=1, jobs=2, runs_dir=tmp_path / "runs", torchrun=2)
    assert sorted(launched) == [("an", 0, 2), ("full", 0, 2)]


def test_train_command_plain_and_under_torchrun(table, tmp_path):
    run = expand(read_table(str(table)), "quick", None, tmp_path / "runs")[0]
    plain = train_command(run, threads=2)
    assert plain[:5] == [sys.executable, "-m", "mlml", "train", "--config"] and "--resume" in plain
    assert "run.threads=2" in plain and "run.seed=0" in plain
    distributed = train_command(run, threads=1, torchrun=4)
    assert distributed[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "mlml"]
    assert distributed[7:] == [a if a != "run.threads=2" else "run.threads=1" for a in plain[3:]]


def test_list_shows_measured_cost_when_there_is_one(tmp_path):
    assert "measured: " not in list_tables(tmp_path).replace("not measured: ", "")
    entry = {"runs": 9, "seeds": 3, "train_seconds": 600.0, "hardware": "x86_64, 2 CPU cores, no GPU", "commit": "abc",
             "wall_seconds": 330.0, "jobs": 2, "torchrun": 0}
    (tmp_path / "baselines.timing.json").write_text(json.dumps({"quick": entry}))
    listed = list_tables(tmp_path)
    assert "--profile quick: 3 seeds, measured: 9 runs (3 seeds), 10.0 min of training on x86_64, 2 CPU cores, no GPU; 5.5 min wall with --jobs 2" in listed
    assert "--profile full: 3 seeds, not yet measured (GPU)" in listed


def test_table_provenance_comes_from_the_runs_not_the_machine_that_builds_it():
    from mlml.experiments import provenance

    runs = [{"train_seconds": 60.0, "provenance": {"commit": "abc1234", "versions": "Python 3.12", "hardware": "16 CPU cores"}},
            {"train_seconds": 60.0, "provenance": {"commit": "abc1234", "versions": "Python 3.12", "hardware": "H100"}},
            {"train_seconds": 60.0}]
    lines = provenance("mlml table runs/x", runs)
    assert lines[1].startswith("Commit: abc1234 (2 runs); not recorded (1 run); Python 3.12 (2 runs)")
    assert lines[2] == "Hardware: 16 CPU cores (1 run); H100 (1 run); not recorded (1 run)"
    assert provenance("c", runs[:1])[1:3] == ["Commit: abc1234; Python 3.12", "Hardware: 16 CPU cores"]


def test_grouped_heads_table_builds_every_run(tmp_path):
    """Every run of the grouped-heads table, in both profiles, is a valid config whose model, data
    and method match (grouped methods with the grouped head, pattern data, one object per image)."""
    from mlml.config import load_config
    from mlml.data.synthetic import synthetic_label_space

    spec = read_table("grouped_heads")
    for profile in ("quick", "full"):
        runs = expand(spec, profile, 1, tmp_path)
        assert len(runs) == len(spec["settings"]) * len(spec["methods"])
        for run in runs:
            cfg = load_config(run.config, list(run.overrides))
            synthetic = cfg.data.settings("synthetic")
            assert synthetic.max_objects == 1 and synthetic.num_patterns == 3
            assert (cfg.model.head == "grouped") == cfg.method.name.startswith("grouped"), run.method
            assert synthetic_label_space(synthetic).group("pattern").has_unknown
            assert cfg.data.groups == ({"pattern": {"has_unknown": False}} if run.method == "grouped_no_unknown" else {})


def test_an_interrupted_run_is_not_resumed_under_an_edited_profile(table, tmp_path, monkeypatch, capsys):
    """reproduce resumes an unfinished run with `mlml train --resume` (train_command): after the profile
    changed, that command refuses, naming the key, instead of mixing two configs in one run."""
    run = expand(read_table(str(table)), "quick", 1, tmp_path / "runs")[0]
    stop_mid_run(run_config(run), run_dir(run), monkeypatch)
    (tmp_path / "base.toml").write_text("[optim]\nweight_decay = 0.0\n")
    command = train_command(run, threads=1)
    assert "--allow-config-change" not in command
    assert main(command[3:]) == 2                                       # what reproduce's subprocess runs
    assert "optim.weight_decay = 0.0001 in the checkpoint, 0.0 now" in capsys.readouterr().err


# ------------------------------------------------------------------ table integrity
def fake_run(root, setting="sp", method="an", seed=0, split="s1", **changes):
    """A metrics.json as a run writes it, without training: its config with `changes` (dotted keys)."""
    from mlml.config import load_config

    cfg = load_config(None, [f"run.setting={setting}", f"run.method_label={method}", f"run.seed={seed}", "run.experiment=tiny",
                             *(f"{k}={v}" for k, v in changes.items())])
    d = root / setting / method / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    result = {"metrics": {"test/mAP_macro": 0.5 + seed / 100}, "setting": setting, "method": method, "seed": seed,
              "experiment": "tiny", "config": cfg.to_dict(), "split_hash": split}
    (d / "metrics.json").write_text(json.dumps(result))
    return d


def test_seeds_of_one_cell_with_different_configs_are_refused_naming_the_keys(tmp_path):
    fake_run(tmp_path, seed=0)
    fake_run(tmp_path, seed=1, **{"optim.lr": 0.1, "run.threads": 3})    # threads: how it ran, not what it computed
    with pytest.raises(ConfigError, match=r"sp/an seed0 and seed1 differ in keys the table does not vary: optim.lr: 0.002 vs 0.1; "):
        table_from_runs(tmp_path)
    fake_run(tmp_path, seed=1, **{"run.threads": 3})
    assert "| an | 0.5050 ± 0.0071 | 2 |" in table_from_runs(tmp_path)


def test_runs_on_different_splits_never_share_a_row(tmp_path):
    fake_run(tmp_path, seed=0, split="s1")
    fake_run(tmp_path, seed=1, split="s2")
    table = table_from_runs(tmp_path)                             # one row per split
    assert "| an [split s1] |" in table and "| an [split s2] |" in table and "| an |" not in table
    with pytest.raises(ConfigError, match="sp/an seed0 and seed1 were made on different splits"):
        experiments.check_comparable({"name": "tiny"}, [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("metrics.json"))])


def test_a_seed_twice_in_one_cell_is_refused(tmp_path):
    fake_run(tmp_path / "a", seed=0)
    fake_run(tmp_path / "b", seed=0)
    with pytest.raises(ConfigError, match="sp/an has seed 0 more than once"):
        table_from_runs(tmp_path)


def test_runs_of_a_table_may_differ_only_in_the_keys_it_varies(table, tmp_path):
    spec = read_table(str(table))
    runs = tmp_path / "runs"
    fake_run(runs, "sp", "an", **{"method.loss": "an", "data.observation": "single_positive"})
    fake_run(runs, "sp", "full", **{"method.loss": "bce", "data.observation": "full"})           # varied by the table
    experiments.write_table(spec, experiments.collect(runs), None, "c")
    fake_run(runs, "sp", "full", **{"method.loss": "bce", "data.observation": "full", "optim.epochs": 3})
    with pytest.raises(ConfigError, match="sp/an seed0 and sp/full seed0 differ in keys the table does not vary: optim.epochs: 15 vs 3"):
        experiments.write_table(spec, experiments.collect(runs), None, "c")


def test_runs_recorded_before_metrics_held_the_config_are_read_from_config_toml(tmp_path):
    from mlml.config import load_config, to_toml

    d = fake_run(tmp_path, seed=0)
    result = json.loads((d / "metrics.json").read_text())
    del result["config"], result["split_hash"]
    (d / "metrics.json").write_text(json.dumps(result))
    (d / "config.toml").write_text(to_toml(load_config(None, ["optim.lr=0.5"]).to_dict()))
    assert experiments.read_result(d / "metrics.json")["config"]["optim"]["lr"] == 0.5
    fake_run(tmp_path, seed=1)
    with pytest.raises(ConfigError, match="optim.lr: 0.5 vs 0.002"):
        table_from_runs(tmp_path)


def test_runs_on_different_splits_get_rows_of_their_own():
    spec = {"name": "t", "title": "t", "metrics": ["test/mAP_macro"], "settings": {}, "methods": {"an": []}}
    runs = [{"setting": "s", "method": "an", "seed": k, "split_hash": h, "metrics": {"test/mAP_macro": v}}
            for k, (h, v) in enumerate([("aaaa", 0.5), ("aaaa", 0.7), ("bbbb", 0.9)])]
    md = experiments.write_table(spec, runs, None, "cmd")
    assert "| an [split aaaa] | 0.6000 ± 0.1414 | 2 |" in md and "| an [split bbbb] | 0.9000 ± 0.0000 | 1 |" in md
    assert "Splits (split_hash): aaaa (2 runs); bbbb (1 run)" in md
    one = experiments.write_table(spec, runs[:2], None, "cmd")
    assert "| an | 0.6000 ± 0.1414 | 2 |" in one and "Splits (split_hash): aaaa (2 runs)" in one


# ------------------------------------------------------------------ one reproduction of a table at a time
HOLDER = """
import sys, time
from pathlib import Path
from mlml import experiments

def launch(run, threads, torchrun):           # stands for a long training run
    Path(sys.argv[3]).write_text("started")
    while not Path(sys.argv[4]).exists():
        time.sleep(0.05)
    raise SystemExit(0)

experiments.launch = launch
experiments.reproduce(sys.argv[1], "quick", seeds=1, runs_dir=Path(sys.argv[2]), results_dir=Path(sys.argv[2]) / "results")
"""


def start_holder(table, tmp_path):
    import subprocess

    started, go = tmp_path / "started", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(table), str(tmp_path / "runs"), str(started), str(go)])
    for _ in range(600):
        if started.exists() or proc.poll() is not None:
            break
        import time
        time.sleep(0.1)
    assert started.exists(), "the first reproduction did not start"
    return proc, go


def test_a_second_reproduction_of_a_table_refuses_naming_the_first(table, tmp_path, capsys):
    import signal

    proc, go = start_holder(table, tmp_path)
    lock = tmp_path / "runs" / "tiny" / "reproduce.lock"
    try:
        assert json.loads(lock.read_text())["pid"] == proc.pid
        assert main(["reproduce", str(table), "--seeds", "1", "--runs-dir", str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by process {proc.pid} on this host" in err
    finally:
        proc.send_signal(signal.SIGKILL)         # killed outright: its lock stays, naming a dead process
        proc.wait(60)
    assert json.loads(lock.read_text())["pid"] == proc.pid
    with experiments.table_lock(lock, "test"):   # a dead local owner's lock is taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()                     # and released at the end


def test_a_lock_held_on_another_host_is_not_taken_over(tmp_path):
    lock = tmp_path / "reproduce.lock"
    lock.write_text(json.dumps({"pid": 2**22 + 1, "host": "another-node", "since": "then", "what": "mlml reproduce x"}))
    with pytest.raises(experiments.LockedError, match="in use by process 4194305 on host another-node since then"):
        with experiments.table_lock(lock, "test"):
            pass
    assert json.loads(lock.read_text())["host"] == "another-node"


def test_wait_waits_for_the_lock(tmp_path):
    import threading

    lock = tmp_path / "reproduce.lock"
    order = []
    with experiments.table_lock(lock, "first"):
        def second():
            with experiments.table_lock(lock, "second", wait=True, poll=0.05):
                order.append("second")
        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        order.append("first done")
    t.join(10)
    assert order == ["first done", "second"] and not lock.exists()


def test_an_unreadable_metrics_file_is_named(tmp_path):
    d = fake_run(tmp_path, seed=0)
    (d / "metrics.json").write_text('{"metrics": {"test/mAP')
    with pytest.raises(ConfigError, match=r"seed0/metrics.json: cannot be read as a run's results"):
        table_from_runs(tmp_path)
    (d / "metrics.json").write_text('[]')
    with pytest.raises(ConfigError, match="not the metrics.json of a run"):
        table_from_runs(tmp_path)
