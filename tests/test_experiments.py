import itertools
import json
import os
import sys

import pytest

from mlml import experiments
from mlml.cli import main
from mlml.config import ConfigError
from mlml.experiments import TABLES_DIR, expand, list_tables, read_table, reproduce, run_config, run_dir, table_from_runs, train_command
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


def test_skip_leaves_cells_out_of_the_grid_and_names_a_typo(table, tmp_path):
    """`skip` ("<setting>/<method>") before any section, and a profile's own list, which adds to it."""
    from mlml.experiments import profile_fingerprint

    text = table.read_text()
    before = profile_fingerprint(read_table(str(table)), "quick")
    table.write_text('skip = ["sp/full"]\n' + text)
    runs = expand(read_table(str(table)), "quick", None, tmp_path / "runs")
    assert [(r.method, r.seed) for r in runs] == [("an", 0), ("an", 1)]
    assert profile_fingerprint(read_table(str(table)), "quick") != before
    table.write_text(text.replace("seeds = 2\n", 'seeds = 2\nskip = ["sp/an"]\n'))
    assert [r.method for r in expand(read_table(str(table)), "quick", None, tmp_path / "runs")] == ["full", "full"]
    for entry in ("sp/typo", "other/an", "an"):
        table.write_text(f'skip = ["{entry}"]\n' + text)
        with pytest.raises(ConfigError, match="must be .<setting>/<method>. of the table"):
            read_table(str(table))


def test_reproduce_twice_trains_nothing_the_second_time_and_gives_the_same_table(table, tmp_path, capsys, monkeypatch):
    runs, results = tmp_path / "runs", tmp_path / "results"
    first = reproduce(str(table), "quick", runs_dir=runs, results_dir=results)
    assert "4 to run" in capsys.readouterr().err
    mtimes = {p: p.stat().st_mtime for p in runs.rglob("metrics.json")}
    timing = json.loads((results / "tiny.timing.json").read_text())["quick"]
    assert timing["runs"] == 4 and timing["seeds"] == 2 and timing["train_seconds"] > 0 and timing["jobs"] == 1 and "CPU cores" in timing["hardware"]
    assert timing["fingerprint"] == experiments.profile_fingerprint(read_table(str(table)), "quick")

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
    assert "Wall time: " in first and "with --jobs 1 (profile quick, the last reproduction that trained every run at commit" in first
    assert "| best epoch (max)/epochs, slope |" in first and "/2, slope n/a |" in first      # 2 epochs: too few for a slope
    assert len((results / "tiny.runs.csv").read_text().splitlines()) == 1 + 4
    assert len(list((runs / "tiny").glob("events.out.tfevents.*"))) == 1     # the custom-scalars layout
    rebuilt = table_from_runs(runs / "tiny", results)                         # `mlml table runs/tiny --results-dir ...`
    assert rebuilt == first.replace(f"mlml reproduce {table} --profile quick", f"mlml table {runs / 'tiny'}")
    assert len(list((runs / "tiny").glob("events.out.tfevents.*"))) == 1
    # A finished run of another config (as another profile's would be) is not reused.
    (tmp_path / "base.toml").write_text("[optim]\nweight_decay = 0.0\n")
    with pytest.raises(ConfigError, match="optim.weight_decay = 0.0001, wanted 0.0"):
        reproduce(str(table), "quick", runs_dir=runs, results_dir=results)


def test_seeds_option_reproduces_a_subset(table, tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(experiments, "launch", lambda run, threads, torchrun, local=None: launched.append((run.method, run.seed, torchrun)))
    monkeypatch.setattr(experiments, "record_timing", lambda *args: None)
    with pytest.raises(FileNotFoundError):        # nothing really trained, so no metrics.json to read
        reproduce(str(table), "quick", seeds=1, jobs=2, runs_dir=tmp_path / "runs", torchrun=2)
    assert sorted(launched) == [("an", 0, 2), ("full", 0, 2)]


def test_only_trains_the_named_cells_and_writes_the_table_once_every_run_is_done(table, tmp_path, monkeypatch, capsys):
    """`--only "<setting>/<method>"` (wildcards): a new row trained alone; no table or cost until the grid is whole."""
    from mlml.config import config_hash, to_toml

    launched = []

    def fake_launch(run, threads, torchrun, local=None):  # writes what a run writes, without training
        launched.append((run.method, run.seed))
        cfg, d = run_config(run), run_dir(run)
        d.mkdir(parents=True)
        (d / "config.toml").write_text(to_toml(cfg.to_dict()))
        (d / "metrics.json").write_text(json.dumps({"metrics": {"test/mAP_macro": 0.5}, "setting": run.setting, "method": run.method,
                                                    "seed": run.seed, "experiment": "tiny", "config": cfg.to_dict(),
                                                    "config_hash": config_hash(cfg), "split_hash": "s"}))

    monkeypatch.setattr(experiments, "launch", fake_launch)
    runs, results = tmp_path / "runs", tmp_path / "results"
    with pytest.raises(ConfigError, match="--only 'sp/typo' names no cell of the table; its cells: sp/an, sp/full"):
        reproduce(str(table), "quick", runs_dir=runs, results_dir=results, only=["sp/typo"])
    said = reproduce(str(table), "quick", runs_dir=runs, results_dir=results, only=["*/full"])
    assert launched == [("full", 0), ("full", 1)]
    assert "2 to run (--only; 2 more missing)" in capsys.readouterr().err
    assert said.startswith("2 runs of 4 done") and "trains the 2 runs left" in said
    assert f"`mlml table {runs / 'tiny'} --results-dir DIR`" in said   # what is done so far, tabled elsewhere
    assert not results.exists()                           # neither a partial table nor a cost
    partial = table_from_runs(runs / "tiny", tmp_path / "partial")
    assert "| full | 0.5000 ± 0.0000 | 2 |" in partial and "| an |" not in partial
    assert reproduce(str(table), "quick", runs_dir=runs, results_dir=results, only=["sp/full"]).startswith("2 runs of 4")
    assert launched == [("full", 0), ("full", 1)]         # done runs are not trained again
    md = reproduce(str(table), "quick", runs_dir=runs, results_dir=results)
    assert launched[2:] == [("an", 0), ("an", 1)] and "| an |" in md and "| full |" in md


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
    assert "--profile quick: 3 seeds (9 runs), measured: 9 runs (3 seeds), 10.0 min of training on x86_64, 2 CPU cores, no GPU; 5.5 min wall with --jobs 2" in listed
    assert "--profile full: 3 seeds (9 runs), not yet measured (GPU)" in listed
    assert "--profile real [track real: results/baselines.real.md]: 3 seeds (9 runs), " in listed


def test_list_counts_each_profiles_runs_with_its_own_skip_list(tmp_path):
    """A profile's `skip` leaves cells out of that profile only: `--list` counts the runs each profile trains."""
    import tomllib

    raw = tomllib.loads((TABLES_DIR / "semi_study.toml").read_text())
    grid = len(raw["settings"]) * len(raw["methods"])
    quick_skip, table_skip = raw["profiles"]["quick"].get("skip", []), raw["skip"]
    assert quick_skip and not raw["profiles"]["real"].get("skip") and not set(quick_skip) & set(table_skip)
    listed = list_tables(tmp_path).splitlines()
    head = listed.index(next(x for x in listed if x.startswith("semi_study: ")))
    profiles = {x.split()[1].rstrip(":"): x for x in itertools.takewhile(lambda x: x.startswith("  --profile "), listed[head + 1:])}
    quick, real = profiles["quick"], profiles["real"]
    assert f"3 seeds ({(grid - len(table_skip) - len(quick_skip)) * 3} runs)" in quick
    assert f"3 seeds ({(grid - len(table_skip)) * 3} runs)" in real


def test_list_says_when_a_measured_profile_changed_since(tmp_path):
    from mlml.experiments import profile_fingerprint

    spec = read_table("baselines")
    now = profile_fingerprint(spec, "real")
    assert now == profile_fingerprint(read_table("baselines"), "real") != profile_fingerprint(spec, "quick")
    entry = {"runs": 9, "seeds": 3, "train_seconds": 600.0, "hardware": "x86_64", "commit": "abc"}
    for fingerprint, stale in ((now, False), ("0" * 16, True)):
        (tmp_path / "baselines.timing.json").write_text(json.dumps({"real": {**entry, "fingerprint": fingerprint}}))
        line = next(x for x in list_tables(tmp_path).splitlines() if x.startswith("  --profile real [track real: results/baselines.real.md]"))
        assert line.endswith("(at abc: its config or rows changed since)") is stale, line


def test_profile_fingerprint_follows_the_config_and_the_rows_not_the_comments(tmp_path):
    from mlml.experiments import profile_fingerprint

    (tmp_path / "base.toml").write_text("[optim]\nepochs = 2\n")
    (tmp_path / "c.toml").write_text('base = "base.toml"\n[model]\nwidth = 8\n')
    text = ('title = "t"\nmetrics = ["test/mAP_macro"]\n[profiles.quick]\nconfig = "c.toml"\n'
            '[settings]\nsp = []\n[methods]\nan = ["method.loss=an"]\n')
    (tmp_path / "t.toml").write_text(text)
    first = profile_fingerprint(read_table(str(tmp_path / "t.toml")), "quick")
    (tmp_path / "c.toml").write_text('# a comment\nbase = "base.toml"\n\n[model]\nwidth = 8   # same\n')
    assert profile_fingerprint(read_table(str(tmp_path / "t.toml")), "quick") == first
    for path, content in ((tmp_path / "base.toml", "[optim]\nepochs = 3\n"),
                          (tmp_path / "t.toml", text.replace("method.loss=an", "method.loss=em"))):
        old = path.read_text()
        path.write_text(content)
        assert profile_fingerprint(read_table(str(tmp_path / "t.toml")), "quick") != first, path.name
        path.write_text(old)


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


def test_a_varied_table_valued_key_varies_every_key_under_it(tmp_path):
    # grouped_heads varies `data.groups={pattern = {has_unknown = false}}`: the runs' configs differ in
    # data.groups.pattern.has_unknown, which the table varies; a key it does not vary is still refused.
    spec = {"name": "t", "settings": {"sp": []}, "methods": {"a": [], "b": ["data.groups={pattern = {has_unknown = false}}"]}}
    fake_run(tmp_path, "sp", "a")
    fake_run(tmp_path, "sp", "b", **{"data.groups": "{pattern = {has_unknown = false}}"})
    experiments.check_comparable(spec, experiments.collect(tmp_path))
    fake_run(tmp_path, "sp", "b", **{"data.groups": "{pattern = {has_unknown = false}}", "data.batch_size": 64})
    with pytest.raises(ConfigError, match="differ in keys the table does not vary: data.batch_size"):
        experiments.check_comparable(spec, experiments.collect(tmp_path))


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

def launch(run, threads, torchrun, local=None):    # stands for a long training run
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


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_stopped_reproduction_stops_its_runs_with_their_checkpoints_and_starts_no_more(table, tmp_path, stop):
    """SIGTERM to a local `reproduce --jobs 2` (as `kill` or a scheduler sends it), or SIGHUP (its
    terminal closed): the two runs in progress write last.pt and exit, the two queued ones never
    start, no trainer outlives it, and the exit code says "stopped, run again" (75)."""
    import signal
    import subprocess
    import time

    # Far longer than the test; a setting's overrides win over the base config, so in the setting (TINY has
    # epochs=2: a run then took 0.5 s, and on a loaded machine one finished before the signal, a flaky failure).
    table.write_text(table.read_text().replace('"data.observation=single_positive"', '"data.observation=single_positive", "optim.epochs=500"'))
    assert "optim.epochs=500" in table.read_text()
    runs_dir = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "mlml", "reproduce", str(table), "--jobs", "2", "--runs-dir", str(runs_dir),
                             "--results-dir", str(tmp_path / "results")], stderr=subprocess.PIPE, text=True)
    dirs = [run_dir(r) for r in expand(read_table(str(table)), "quick", None, runs_dir)]
    started = lambda: [d for d in dirs if (d / "config.toml").exists()]     # written once a trainer handles SIGTERM
    deadline = time.monotonic() + 120
    while len(started()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(started()) == 2, "two runs did not start"
    assert not any((d / "metrics.json").exists() for d in dirs), "a run finished before the stop: nothing left to test"
    trainers = [json.loads((d / "run.lock").read_text())["pid"] for d in started()]
    proc.send_signal(getattr(signal, stop))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and f"stopped by {stop}" in err and "resumes them" in err
    for pid in trainers:                                  # no trainer left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for d in started():
        assert (d / "checkpoints" / "last.pt").exists() and not (d / "metrics.json").exists() and not (d / "run.lock").exists()
    assert len(started()) == 2                            # the queued runs never started


def test_a_reproduction_under_nohup_keeps_ignoring_sighup(monkeypatch):
    import signal

    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_IGN if s == signal.SIGHUP else signal.SIG_DFL)
    installed = {}
    monkeypatch.setattr(signal, "signal", lambda s, h: installed.setdefault(s, h))
    with experiments.relaying_stop_signals(experiments.LocalRuns().stop):
        assert signal.SIGTERM in installed and signal.SIGINT in installed and signal.SIGHUP not in installed


def test_status_estimates_the_training_left_from_the_done_runs_of_each_cell(table, tmp_path):
    runs = expand(read_table(str(table)), "quick", None, tmp_path / "runs")
    def finish(method, seed, seconds):
        d = run_dir(next(r for r in runs if r.method == method and r.seed == seed))
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"metrics": {}, "train_seconds": seconds}))
    status = lambda: experiments.status(str(table), "quick", runs_dir=tmp_path / "runs").splitlines()[0]
    assert "training left" not in status()                                   # nothing done: nothing to go by
    finish("an", 0, 3600.0)
    assert status().endswith("1 done, 3 missing; about 3.0 h of training left (from the done runs' train_seconds)")
    finish("an", 1, 3600.0)
    finish("full", 0, 10800.0)                              # full seed 1 costs what its cell's seed 0 did, not the mean (1.7 h)
    assert "3 done, 1 missing; about 3.0 h of training left" in status()
    finish("full", 1, 10800.0)
    assert "training left" not in status() and "writes the table" in status()


def test_status_scales_runs_of_another_machine_to_this_ones_speed(table, tmp_path):
    """Runs carried from a machine 4x slower (`mlml runs import`) must not make the estimate 4x too long."""
    runs = expand(read_table(str(table)), "quick", None, tmp_path / "runs")
    dirs = {r: run_dir(r) for r in runs}
    def finish(method, seed, seconds, machine):
        r = next(r for r in runs if r.method == method and r.seed == seed)
        dirs[r].mkdir(parents=True)
        (dirs[r] / "metrics.json").write_text(json.dumps({"train_seconds": seconds, "provenance": {"hardware": machine}}))
        return r
    done = {finish("an", 0, 3600.0, "fast"), finish("an", 1, 14400.0, "slow"), finish("full", 0, 43200.0, "slow")}
    left, how = experiments.training_left(runs, dirs, done, here="fast")
    assert left == pytest.approx(10800.0) and "scaled to this one's speed (x0.25)" in how     # full seed 1: 43200 s x 0.25
    left, how = experiments.training_left(runs, dirs, done, here="a third machine")             # no run here: as recorded
    assert left == pytest.approx(43200.0) and "scaled" not in how


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


# ------------------------------------------------------------------ convergence and the add-on section
def curve_run(root, setting, method, seed, curve, test, overrides=(), every=1, best_epoch=None):
    """A fabricated run whose validation `val/mAP_macro` follows `curve` (one value per validation, every
    `every` epochs); metrics.json holds the best value on val, as the trainer's best checkpoint would."""
    from mlml.config import load_config

    cfg = load_config(None, [f"run.setting={setting}", f"run.method_label={method}", f"run.seed={seed}", "run.experiment=tiny",
                             f"eval.every={every}", *overrides])
    history = [{"epoch": every * (i + 1), "val/mAP_macro": v} for i, v in enumerate(curve)]
    best = best_epoch or every * (max(range(len(curve)), key=lambda i: curve[i]) + 1)
    d = root / setting / method / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    result = {"metrics": {"test/mAP_macro": test, "val/mAP_macro": max(curve)}, "setting": setting, "method": method, "seed": seed,
              "experiment": "tiny", "config": cfg.to_dict(), "split_hash": "s", "history": history, "best_epoch": best}
    (d / "metrics.json").write_text(json.dumps(result))
    return result


def test_convergence_fits_the_slope_of_the_last_quarter_of_the_epochs(tmp_path):
    # 12 epochs: k = 3; a steep rise until epoch 9 must not leak into the slope of epochs 10-12.
    steep_then_flat = [0.1 * e for e in range(1, 10)] + [0.95, 0.96, 0.97]
    c = experiments.convergence(curve_run(tmp_path, "s", "a", 0, steep_then_flat, 0.5))
    assert (c.window, c.epochs, c.best_epoch) == (3, 12, 12) and c.slope == pytest.approx(0.01) and c.gain == pytest.approx(0.03)
    # 20 epochs: k = 5; least squares over epochs 16-20 (0, 0, 0, 0, 0.01 -> slope 0.002).
    c = experiments.convergence(curve_run(tmp_path, "s", "b", 0, [0.5] * 19 + [0.51], 0.5))
    assert c.window == 5 and c.slope == pytest.approx(0.002) and c.gain == pytest.approx(0.01) and c.improving
    # Validated every 4 epochs: fewer than 3 validations in the last k = 3 epochs, so the last 3 (epochs 4, 8, 12).
    c = experiments.convergence(curve_run(tmp_path, "s", "c", 0, [0.5, 0.54, 0.58], 0.5, every=4))
    assert c.epochs == 12 and c.slope == pytest.approx(0.01)
    # The trainer's best epoch is kept (the checkpoint test metrics come from); two validations give no slope.
    c = experiments.convergence(curve_run(tmp_path, "s", "d", 0, [0.5, 0.6], 0.5, best_epoch=1))
    assert c.best_epoch == 1 and c.slope is None and c.gain is None and not c.improving
    assert experiments.convergence({"metrics": {}, "seed": 0}) is None       # recorded before histories were


@pytest.mark.parametrize("rise, improving", [(0.004, False), (0.006, True)])
def test_a_run_is_improving_when_k_more_epochs_at_its_trend_gain_the_tolerance(tmp_path, rise, improving):
    assert experiments.IMPROVING_GAIN == 0.005        # the documented tolerance (docs/design.md, "Tables")
    curve = [0.5] * 9 + [0.8, 0.8 + rise / 3, 0.8 + 2 * rise / 3]    # slope rise / 3 per epoch, k = 3
    assert experiments.convergence(curve_run(tmp_path, "s", "a", 0, curve, 0.5)).improving is improving


def test_the_table_shows_convergence_per_row_and_lists_the_rows_still_improving(tmp_path):
    results = []
    for seed in range(2):
        results.append(curve_run(tmp_path, "sp", "flat", seed, [0.6 + 0.02 * min(e, 6) for e in range(12)], 0.7))
        # mean gain over k = 3 epochs 0.015 (seed 0: 0.03, seed 1: 0.0): the row is improving, one seed of two
        results.append(curve_run(tmp_path, "sp", "rising", seed, [0.5 + 0.01 * (1 - seed) * e for e in range(12)], 0.6))
        results.append(curve_run(tmp_path, "sp", "ends_best", seed, [0.6] * 11 + [0.601], 0.6))
    spec = {"name": "tiny", "title": "t", "metrics": ["test/mAP_macro"], "settings": {}, "methods": {}}
    md = experiments.write_table(spec, results, tmp_path / "results", "cmd")
    assert "| flat | 0.7000 ± 0.0000 | 7.0 (7)/12, +0.0000 | 2 |" in md
    assert "| rising | 0.6000 ± 0.0000 | 6.5 (12)/12, +0.0050 ↑ | 2 |" in md
    assert "| ends_best | 0.6000 ± 0.0000 | 12.0 (12)/12, +0.0005 | 2 |" in md
    assert "Still improving (1 of 3 rows): sp/rising (+0.0150 over 3 epochs, 1 of 2 seeds improving)" in md
    assert "Best at the last epoch in every seed, though not improving by the slope: sp/ends_best." in md
    table_csv = (tmp_path / "results" / "tiny.csv").read_text()
    assert "sp,rising,convergence/slope_per_epoch,0.005000,0.007071,2" in table_csv
    assert "sp,flat,convergence/best_epoch,7.000000,0.000000,2" in table_csv
    runs = (tmp_path / "results" / "tiny.runs.csv").read_text().splitlines()
    assert runs[0].startswith("setting,method,seed,split_hash,addons,select,select_value,epochs,best_epoch,window_epochs,slope_per_epoch,gain_over_window,improving")
    assert "sp,rising,0,s,,val/mAP_macro,0.610000,12,12,3,0.010000,0.030000,True,0.600000" in runs
    assert "sp,rising,1,s,,val/mAP_macro,0.500000,12,1,3,0.000000,0.000000,False,0.600000" in runs
    flat_md = experiments.write_table(spec, [r for r in results if r["method"] == "flat"], None, "cmd")
    assert "No row is still improving (1 rows)." in flat_md and "Still improving" not in flat_md


TEACHER = "method.teacher={weight = 1.0}"
BRANCH = "method.domain_branch={weight = 0.3}"


def addon_table(tmp_path, without_seeds=(0, 1, 2)):
    """Per seed s (test metric): base_val_best 0.60 + 0.01 s, base_test_best 0.80 (lower val),
    teacher_val_best 0.70 + 0.02 s, teacher_test_best 0.95 (lower val); and the branch on one row."""
    results = []
    for s in range(3):
        if s in without_seeds:
            results.append(curve_run(tmp_path, "sp", "base_val_best", s, [0.8, 0.8, 0.8], 0.60 + 0.01 * s))
        results.append(curve_run(tmp_path, "sp", "base_test_best", s, [0.7, 0.7, 0.7], 0.80))
        results.append(curve_run(tmp_path, "sp", "teacher_val_best", s, [0.75, 0.75, 0.75], 0.70 + 0.02 * s, [TEACHER]))
        results.append(curve_run(tmp_path, "sp", "teacher_test_best", s, [0.65, 0.65, 0.65], 0.95, [TEACHER]))
        results.append(curve_run(tmp_path, "sp", "teacher_branch", s, [0.5, 0.5, 0.5], 0.99, [TEACHER, BRANCH]))
    return results


def test_the_add_on_is_compared_with_the_best_row_without_it_both_chosen_on_validation(tmp_path):
    results = addon_table(tmp_path)
    comparisons = {c.addon: c for c in experiments.addon_comparisons({}, results, "test/mAP_macro")}
    teacher = comparisons["method.teacher"]
    assert (teacher.with_it.method, teacher.without.method) == ("teacher_val_best", "base_val_best")    # never the test-best
    # paired by seed: differences 0.10, 0.11, 0.12
    assert teacher.diff == pytest.approx(0.11) and teacher.std == pytest.approx(0.01) and teacher.pairing == "paired by seed (3)"
    branch = comparisons["method.domain_branch"]           # without the branch: every other row, teachers included
    assert (branch.with_it.method, branch.without.method) == ("teacher_branch", "base_val_best")
    md = experiments.write_table({"name": "tiny", "title": "t", "metrics": ["test/mAP_macro"], "settings": {}, "methods": {}},
                                 results, None, "cmd")
    assert ("| teacher | sp | teacher_val_best (0.7500) | 0.7200 ± 0.0200 | base_val_best (0.8000) | 0.6100 ± 0.0100 | "
            "+0.1100 ± 0.0100 | +11.0 | paired by seed (3) |") in md
    assert "| domain_branch | sp | teacher_branch (0.5000) |" in md
    only = experiments.addon_comparisons({"addons": ["method.domain_branch"]}, results, "test/mAP_macro")
    assert [c.addon for c in only] == ["method.domain_branch"]                      # a table's `addons` replaces the defaults
    assert experiments.addon_comparisons({"addons": []}, results, "test/mAP_macro") == []


def test_a_row_that_changes_the_labels_is_a_reference_not_a_side_of_the_comparison(tmp_path):
    results = addon_table(tmp_path) + [curve_run(tmp_path, "sp", "full_labels", s, [0.9, 0.9, 0.9], 0.99) for s in range(3)]
    spec = {"methods": {"full_labels": ["method.loss=bce", "data.observation=full"], "base_val_best": ["method.loss=an"]}}
    teacher = next(c for c in experiments.addon_comparisons(spec, results, "test/mAP_macro") if c.addon == "method.teacher")
    assert teacher.without.method == "base_val_best"                # the full-label row has the best validation value
    assert experiments.label_references(spec) == {"full_labels"}
    unmarked = next(c for c in experiments.addon_comparisons({}, results, "test/mAP_macro") if c.addon == "method.teacher")
    assert unmarked.without.method == "full_labels"


def test_rows_on_other_seeds_are_compared_unpaired(tmp_path):
    results = addon_table(tmp_path, without_seeds=(0, 1))
    teacher = next(c for c in experiments.addon_comparisons({}, results, "test/mAP_macro") if c.addon == "method.teacher")
    # 0.72 - 0.605, std sqrt(0.02^2 + 0.00707^2)
    assert teacher.diff == pytest.approx(0.115) and teacher.std == pytest.approx((0.0004 + 0.00005) ** 0.5)
    assert teacher.pairing == "unpaired (3 vs 2 seeds)"


def test_a_table_without_rows_on_both_sides_of_an_add_on_has_no_add_on_section(tmp_path):
    results = [r for r in addon_table(tmp_path) if r["method"].startswith("base")]
    md = experiments.write_table({"name": "tiny", "title": "t", "metrics": ["test/mAP_macro"], "settings": {}, "methods": {}},
                                 results, None, "cmd")
    assert experiments.addon_comparisons({}, results, "test/mAP_macro") == [] and "Add-on" not in md


def test_runs_without_a_recorded_config_take_the_add_on_from_the_table_overrides():
    spec = {"settings": {"sp": ["data.observation=single_positive"]}, "methods": {"mt": ["method.loss=an", TEACHER], "an": ["method.loss=an"]}}
    assert experiments.has_addon({"setting": "sp", "method": "mt"}, "method.teacher", spec)
    assert not experiments.has_addon({"setting": "sp", "method": "an"}, "method.teacher", spec)
    assert not experiments.has_addon({"setting": "sp", "method": "mt"}, "method.domain_branch", spec)


def test_the_header_records_the_wall_time_of_the_reproduction_that_trained_the_runs():
    runs = [{"provenance": {"commit": "abc"}}] * 4
    timing = {"quick": {"runs": 4, "commit": "abc", "wall_seconds": 330.0, "jobs": 2, "torchrun": 0, "wall_commit": "abc"},
              "full": {"runs": 4, "commit": "def", "wall_seconds": 60.0, "jobs": 1, "torchrun": 4}}
    assert experiments.wall_time(timing, "quick", runs) == "5.5 min with --jobs 2 (profile quick, the last reproduction that trained every run at commit abc)"
    assert experiments.wall_time(timing, None, runs).startswith("5.5 min with --jobs 2 (profile quick")     # found by commit and runs
    assert experiments.wall_time(timing, None, runs[:3]).startswith("not recorded")
    assert experiments.wall_time(timing, "full", runs) == "1.0 min with --jobs 1 --torchrun 4 (profile full, the last reproduction that trained every run)"
    assert experiments.provenance("c", runs, "x")[-1] == "Wall time: x"


def test_a_resumed_reproduction_keeps_a_wall_time_only_from_the_same_configuration(tmp_path):
    runs = [{"seed": 0, "train_seconds": 1.0, "provenance": {"commit": "new"}}]
    old = {"runs": 1, "commit": "old", "wall_seconds": 60.0, "jobs": 2, "torchrun": 0, "wall_commit": "old", "fingerprint": "f1"}
    (tmp_path / "t.timing.json").write_text(json.dumps({"quick": old}))
    experiments.record_timing("t", "quick", runs, None, 2, 0, tmp_path, "f1")
    assert json.loads((tmp_path / "t.timing.json").read_text())["quick"]["wall_seconds"] == 60.0   # same profile: kept
    experiments.record_timing("t", "quick", runs, None, 2, 0, tmp_path, "f2")
    entry = json.loads((tmp_path / "t.timing.json").read_text())["quick"]
    assert "wall_seconds" not in entry and "wall_commit" not in entry and entry["fingerprint"] == "f2"
    assert experiments.wall_time({"quick": entry}, "quick", runs).startswith("not recorded")
    experiments.record_timing("t", "quick", runs, 30.0, 2, 0, tmp_path, "f2")                       # a complete reproduction
    assert json.loads((tmp_path / "t.timing.json").read_text())["quick"]["wall_seconds"] == 30.0


def test_a_table_declares_its_add_ons_as_config_keys(table):
    text = table.read_text()
    table.write_text('addons = ["method.teacher"]\n' + text)
    assert read_table(str(table))["addons"] == ["method.teacher"]
    table.write_text('addons = ["method.teachr"]\n' + text)
    with pytest.raises(ConfigError, match="addons: 'method.teachr' is not a config key"):
        read_table(str(table))
    table.write_text('addons = "method.teacher"\n' + text)
    with pytest.raises(ConfigError, match="'addons' must be a list of config keys"):
        read_table(str(table))
    table.write_text(text + '[baselines]\nsp = ["single_positive"]\n')
    assert read_table(str(table))["baselines"] == {"sp": ["single_positive"]}
    table.write_text(text + '[baselines]\nten_percent = ["single_positive"]\n')
    with pytest.raises(ConfigError, match="baselines: 'ten_percent' is not a setting of the table; known: sp"):
        read_table(str(table))


def test_a_table_may_add_rows_of_another_table_to_the_pool_without_the_add_on(tmp_path):
    """`[baselines]` names another table whose `.runs.csv` rows (on the same splits) join the "without" pool;
    rows that recorded the add-on stay out of it."""
    other_spec = {"name": "other", "title": "o", "metrics": ["test/mAP_macro"], "settings": {}, "methods": {}}
    other = [curve_run(tmp_path / "other", "sp", "role", s, [0.9, 0.9, 0.9], 0.65 + 0.01 * s) for s in range(3)]
    other += [curve_run(tmp_path / "other", "sp", "role_teacher", s, [0.99] * 3, 0.5, [TEACHER]) for s in range(3)]
    experiments.write_table(other_spec, other, tmp_path / "results", "cmd")
    results = addon_table(tmp_path / "tiny")
    spec = {"name": "tiny", "settings": {"sp": []}, "baselines": {"sp": ["other"]}}
    comparisons = {c.addon: c for c in experiments.addon_comparisons(spec, results, "test/mAP_macro", tmp_path / "results")}
    teacher, branch = comparisons["method.teacher"], comparisons["method.domain_branch"]
    assert teacher.without.method == "role (other)" and teacher.diff == pytest.approx(0.06) and teacher.pairing == "paired by seed (3)"
    assert branch.without.method == "role_teacher (other)"          # has the teacher, not the branch
    spec["baselines"] = {"sp": ["other/elsewhere"]}
    with pytest.raises(ConfigError, match="other.runs.csv: no run of setting 'elsewhere'"):
        experiments.addon_comparisons(spec, results, "test/mAP_macro", tmp_path / "results")
    spec["baselines"] = {"sp": ["missing"]}
    with pytest.raises(ConfigError, match="baselines of 'sp' name 'missing' but .*missing.runs.csv does not exist"):
        experiments.addon_comparisons(spec, results, "test/mAP_macro", tmp_path / "results")
    moved = [{**r, "split_hash": "elsewhere"} if r["method"] == "role" and r["seed"] == 1 else r for r in other]
    experiments.write_table(other_spec, moved, tmp_path / "results", "cmd")
    spec["baselines"] = {"sp": ["other"]}
    with pytest.raises(ConfigError, match=r"sp/role \[split elsewhere\] seed1 was made on split elsewhere, this table's sp seed1 on s: they cannot be compared"):
        experiments.addon_comparisons(spec, results, "test/mAP_macro", tmp_path / "results")


# ------------------------------------------------------------------ tracks (a profile on other data)
def test_a_track_profile_has_its_own_entries_runs_and_results(table, tmp_path, monkeypatch):
    """A profile with a `track`: its settings/methods replace the table's (false leaves one out), its
    runs live under runs/<track>/ and its table is results/<table>.<track>.md, beside the other one."""
    with open(table, "a") as f:
        f.write('\n[profiles.other]\nconfig = "base.toml"\ntrack = "other"\nseeds = 1\ntitle = "tiny, other data"\n'
                '[profiles.other.settings]\nsp = ["data.observation=single_positive", "optim.lr=0.01"]\n'
                '[profiles.other.methods]\nfull = false\n')
    from mlml.config import config_hash

    def fake_launch(run, threads, torchrun, local=None):  # writes what a run writes, without training
        cfg, d = run_config(run), run_dir(run)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"metrics": {"test/mAP_macro": 0.5}, "setting": run.setting, "method": run.method,
                                                    "seed": run.seed, "experiment": "tiny", "config": cfg.to_dict(),
                                                    "config_hash": config_hash(cfg), "split_hash": "s"}))

    monkeypatch.setattr(experiments, "launch", fake_launch)
    runs, results = tmp_path / "runs", tmp_path / "results"
    (other,) = expand(read_table(str(table)), "other", None, runs)
    assert other.method == "an" and "optim.lr=0.01" in other.overrides and f"run.out_dir={runs / 'other'}" in other.overrides
    md = reproduce(str(table), "other", runs_dir=runs, results_dir=results)
    assert md.startswith("# tiny, other data") and "| an |" in md and "| full |" not in md
    assert (results / "tiny.other.md").read_text() == md and not (results / "tiny.md").exists()
    assert (results / "tiny.other.runs.csv").exists() and not (results / "tiny.runs.csv").exists()
    assert (runs / "other" / "tiny" / "sp" / "an" / "seed0" / "metrics.json").exists()
    assert json.loads((results / "tiny.timing.json").read_text())["other"]["runs"] == 1
    assert table_from_runs(runs / "other" / "tiny").split("| method |")[1] == md.split("| method |")[1]
    with open(table, "a") as f:
        f.write('typo = ["method.loss=an"]\n')
    with pytest.raises(ConfigError, match="profiles.other.methods.typo: the table has no such entry"):
        expand(read_table(str(table)), "other", None, runs)


@pytest.mark.parametrize("name", ["baselines", "single_positive", "semi_supervised", "grouped_heads", "domain_adversarial"])
def test_every_table_runs_on_the_real_track_through_its_own_keys(name, tmp_path):
    """Every table has a `real` profile on the mnist5k source; its runs are valid configs that set no
    synthetic-data key (which would do nothing there), and k of EPR/ROLE is that data's mean positives."""
    spec = read_table(name)
    runs = expand(spec, "real", 1, tmp_path)
    assert runs and spec["profiles"]["real"]["track"] == "real"
    for run in runs:
        cfg = run_config(run)
        assert cfg.data.source == "mnist5k" and not any(o.startswith("data.synthetic.") for o in run.overrides), run
        if run.method in ("epr", "role", "sigmoid_role"):      # the data's mean positives: 2 with one digit an image
            assert (cfg.method.loss_args or cfg.method.args)["k"] == (2.0 if cfg.data.settings("mnist5k").max_digits == 1 else 3.64)
        assert (cfg.data.settings("mnist5k").max_digits == 1) == (name == "grouped_heads")     # its groups are exclusive
    shortcut = [run_config(r).data.settings("mnist5k").nuisance for r in runs if r.setting == "shortcut"]
    assert all(n == "collection" for n in shortcut) and (name != "domain_adversarial" or shortcut)


def test_a_closed_stderr_loses_progress_lines_not_runs(monkeypatch):
    """`mlml reproduce ... 2>&1 | head`: once head has gone, a finished run must not be counted as failed."""
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", ClosedPipe())
    experiments.progress("  finished 1/2: s/m/seed0")     # raised BrokenPipeError inside the run's thread before
