"""Atomic writes (no partial file after an error, errors name the path) and the run lock (pid + host)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlml import files
from mlml.files import FileLock, LockedError, WriteError, atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


def in_read_only_dir(directory: Path, fn) -> str:
    """Run `fn()` where `directory` cannot be written; returns the error message it raised ("" if none).

    A root process ignores permission bits, so as root `fn` runs in a forked child that dropped to
    user `nobody` (65534) first.
    """
    directory.chmod(0o555)
    try:
        if os.geteuid() != 0:
            try:
                fn()
            except WriteError as err:
                return str(err)
            return ""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # child: no pytest machinery from here on
            os.close(read)
            message = ""
            try:
                os.setgid(65534)
                os.setuid(65534)
                fn()
            except WriteError as err:
                message = str(err)
            except BaseException as err:               # noqa: BLE001 - reported to the parent
                message = f"UNEXPECTED {type(err).__name__}: {err}"
            os.write(write, message.encode() or b"-")
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            out = pipe.read().decode()
        os.waitpid(pid, 0)
        return "" if out == "-" else out
    finally:
        directory.chmod(0o755)


def test_atomic_write_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_a_full_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old content")

    def half_then_full(fd, data):
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "_write_all", half_then_full)
    with pytest.raises(WriteError, match=f"cannot write {path}: No space left on device; free disk space"):
        atomic_write_text(path, "new content that does not fit")
    assert path.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]      # the partial temporary file is gone


def test_a_read_only_directory_names_the_path_and_writes_nothing(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    message = in_read_only_dir(directory, lambda: atomic_write_bytes(directory / "metrics.json", b"{}"))
    assert message.startswith(f"cannot write {directory / 'metrics.json'}: Permission denied"), message
    assert list(directory.iterdir()) == []


def test_a_second_owner_is_refused_with_pid_and_host(tmp_path):
    lock = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mlml.files import FileLock; "
                               "FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(lock)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"in use by process {holder.pid} on this host .*delete {lock}"):
            FileLock(lock, "the run").acquire()
    finally:
        holder.kill()
        holder.wait()
    with FileLock(lock) as taken:                     # its owner died: the stale lock is taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid() and taken.owned
    assert not lock.exists()                          # released


def test_a_lock_of_a_dead_process_is_taken_over_but_not_one_from_another_host_or_garbled(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then"}))
    with FileLock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere-node-7", "since": "then"}))
    with pytest.raises(LockedError, match="process 1 on host elsewhere-node-7"):
        FileLock(lock).acquire()
    lock.write_text("garb")
    with pytest.raises(LockedError, match=f"unreadable; .*delete {lock}"):
        FileLock(lock).acquire()
    assert lock.read_text() == "garb"                 # a refused lock is left alone


def test_a_run_whose_lock_a_live_process_holds_is_running_not_stopped(tmp_path):
    """`mlml reproduce --status` for runs trained by a local `reproduce --jobs N` (no scheduler job):
    the trainer's `run.lock` tells a run being trained now from one stopped at a checkpoint."""
    from mlml.files import lock_owner
    from mlml.launchers import run_states

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    lock = run / "run.lock"
    state = lambda: run_states([run])[run]
    assert state() == ("stopped", "", "") and lock_owner(lock) is None      # no lock
    with FileLock(lock):
        assert state() == ("running", f"pid {os.getpid()}", "")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then"}))
    assert state() == ("stopped", "", "")                                   # its owner died: a stale lock
    lock.write_text(json.dumps({"pid": 7, "host": "elsewhere-node-7", "since": "then"}))
    assert state() == ("stopped", "locked by pid 7 on elsewhere-node-7", "")  # shown, not waited for: it cannot be checked
    lock.write_text("garb")
    assert state() == ("stopped", "", "")
    (run / "checkpoints" / "last.pt").unlink()
    assert state().state == "missing"
