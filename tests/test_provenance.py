"""Provenance: the commit a run names, and when it counts as uncommitted."""

import subprocess

from mlml.provenance import git_commit


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_commit_is_dirty_for_code_changes_but_not_for_rewritten_results(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "mlml").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "mlml" / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "table.md").write_text("| a |\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert git_commit(tmp_path / "mlml") == head
    (tmp_path / "results" / "table.md").write_text("| b |\n")          # what `mlml reproduce` rewrites
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "new.json").write_text("{}")                   # untracked outputs
    assert git_commit(tmp_path / "mlml") == head
    (tmp_path / "mlml" / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "mlml") == f"{head} (with uncommitted changes)"


def test_mlml_commit_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("MLML_COMMIT", "abc1234")
    assert git_commit(tmp_path) == "abc1234"
