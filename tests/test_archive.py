import gzip
import json

import pytest

from mlml import experiments
from mlml.archive import ArchiveError, export_runs, import_runs
from mlml.cli import main
from mlml.experiments import reproduce
from tests.test_experiments import fake_run, table  # noqa: F401  (the fixture)


def test_runs_exported_here_and_imported_elsewhere_are_done_there_and_table_the_same(table, tmp_path, monkeypatch, capsys):  # noqa: F811
    here, there = tmp_path / "here", tmp_path / "there"
    first = reproduce(str(table), "quick", runs_dir=here, results_dir=tmp_path / "results_here")
    (here / "tiny" / "sp" / "an" / "seed0" / "metrics.json").rename(here / "unfinished.json")  # one run not finished here
    archive = tmp_path / "tiny.runs.jsonl.gz"
    assert main(["runs", "export", str(here), "--out", str(archive)]) == 0
    assert "3 finished runs" in capsys.readouterr().out
    assert main(["runs", "import", str(archive), "--runs-dir", str(there)]) == 0
    assert "3 runs written" in capsys.readouterr().out
    assert sorted(p.name for p in (there / "tiny" / "sp" / "full" / "seed0").iterdir()) == ["config.toml", "metrics.json"]

    trained = []
    real_launch = experiments.launch
    monkeypatch.setattr(experiments, "launch", lambda run, *a, **k: (trained.append(run.method + str(run.seed)), real_launch(run, *a, **k)))
    second = reproduce(str(table), "quick", runs_dir=there, results_dir=tmp_path / "results_there")
    assert trained == ["an0"]                                        # only the run the archive did not hold
    strip = lambda t: [ln for ln in t.splitlines() if not ln.startswith(("Wall time", "Training time", "Command"))]
    assert strip(second) == strip(first) and "| an |" in second      # the same seeds' metrics: the same table

    assert main(["runs", "import", str(archive), "--runs-dir", str(there)]) == 0    # twice: nothing new
    assert "0 runs written below" in (out := capsys.readouterr().out) and "3 already there" in out


def write_archive(path, records):
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def a_run(rel="t/sp/an/seed0", **files):
    return {"run": rel, "files": {"metrics.json": json.dumps({"metrics": {"test/mAP_macro": 0.5}}), **files}}


@pytest.mark.parametrize("rel", ["../outside/seed0", "/etc/mlml/seed0", "t/../../x", "", "t\\..\\x"])
def test_an_archive_cannot_write_outside_the_runs_directory(tmp_path, rel):
    archive = tmp_path / "a.jsonl.gz"
    write_archive(archive, [a_run(), a_run(rel)])
    with pytest.raises(ArchiveError, match="not below the runs directory"):
        import_runs(archive, tmp_path / "runs")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outside").exists()   # nothing written, not even the valid run


@pytest.mark.parametrize("content, message", [
    (b"not gzip at all", "not an archive of runs"),
    (gzip.compress(b"{not json\n"), "not an archive of runs"),
    (gzip.compress(b'{"run": "t/a", "files": {"metrics.json": "{}", "run.py": "import os"}}\n'), "a run's files are"),
    (gzip.compress(b'{"run": "t/a", "files": {"config.toml": ""}}\n'), "metrics.json required"),
    (gzip.compress(b'{"run": "t/a", "files": {"metrics.json": "[1, 2]"}}\n'), "not the metrics.json of a run"),
])
def test_an_unreadable_or_foreign_archive_is_refused_by_the_cli_with_its_reason(tmp_path, capsys, content, message):
    archive = tmp_path / "a.jsonl.gz"
    archive.write_bytes(content)
    assert main(["runs", "import", str(archive), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_a_finished_run_is_never_replaced_and_an_unfinished_one_never_declared_done(tmp_path):
    runs = tmp_path / "runs"
    d = fake_run(runs / "tiny", seed=0)
    archive = tmp_path / "a.jsonl.gz"
    assert export_runs(runs, archive) == 1
    assert import_runs(archive, runs) == (0, 1)                       # the same run: already there

    (d / "metrics.json").write_text(json.dumps({"metrics": {"test/mAP_macro": 0.9}}))
    with pytest.raises(ArchiveError, match="differs from the archive's; nothing was imported"):
        import_runs(archive, runs)
    assert json.loads((d / "metrics.json").read_text())["metrics"]["test/mAP_macro"] == 0.9

    (d / "metrics.json").unlink()
    (d / "checkpoints").mkdir()                                       # a run in progress there: resume it, not replace it
    with pytest.raises(ArchiveError, match="unfinished run"):
        import_runs(archive, runs)
    assert not (d / "metrics.json").exists()


def test_a_damaged_metrics_file_is_named_and_nothing_exported(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, seed=0)
    (fake_run(runs, seed=1) / "metrics.json").write_text('{"metrics": ')
    assert main(["runs", "export", str(runs), "--out", str(tmp_path / "a.jsonl.gz")]) == 2
    assert "seed1/metrics.json: unreadable" in capsys.readouterr().err and not (tmp_path / "a.jsonl.gz").exists()


def test_export_refuses_a_missing_or_empty_runs_directory(tmp_path, capsys):
    out = tmp_path / "a.jsonl.gz"
    assert main(["runs", "export", str(tmp_path / "typo"), "--out", str(out)]) == 2
    assert "no such runs directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["runs", "export", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no finished run" in capsys.readouterr().err and not out.exists()


def test_export_never_drops_runs_carried_in_the_archive_it_replaces(tmp_path, capsys):
    """The end of a sitting that forgot to import the last archive: exporting must not lose its runs."""
    out = tmp_path / "a.jsonl.gz"
    first, second = tmp_path / "sitting1", tmp_path / "sitting2"
    fake_run(first, seed=0)
    assert export_runs(first, out) == 1
    fake_run(second, seed=1)                                   # seed 0 was not imported here
    before = out.read_bytes()
    assert main(["runs", "export", str(second), "--out", str(out)]) == 2
    assert "holds 1 run that" in capsys.readouterr().err and out.read_bytes() == before
    import_runs(out, second)                                   # the way out the message names
    assert export_runs(second, out) == 2                       # seed 0 carried on, seed 1 added
    assert export_runs(tmp_path / "sitting1", out, replace=True) == 1
