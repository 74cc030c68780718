"""Files that must survive crashes, full disks and a second process: atomic writes and a run lock.

`atomic_write_bytes(path, data)` writes a temporary file next to `path`, fsyncs it, renames it over
`path` and fsyncs the directory, so after a crash or power loss `path` holds either its old content
or the new one, never a part. An error (disk full, read-only directory) removes the temporary file
and raises `WriteError` naming `path`; the old file is left as it was.

`FileLock(path)` is a lock file holding its owner's pid and host: a second owner is refused with
both named. A lock left by a process that died on this host is taken over; one from another host
cannot be checked from here and must be removed by hand.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path


class WriteError(OSError):
    """A file could not be written (no space, no permission, ...); the message names it."""


class LockedError(FileExistsError):
    """Another live process holds the lock; the message names its pid, host and the lock file."""


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(path: Path, err: OSError) -> WriteError:
    reason = err.strerror or str(err)
    advice = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free quota",
              errno.EACCES: "make the directory writable", errno.EROFS: "choose a writable directory",
              errno.EPERM: "make the directory writable"}.get(err.errno, "check the file system")
    return WriteError(f"cannot write {path}: {reason}; {advice} and run again (the previous file, if any, is unchanged)")


def discard(path: Path) -> None:
    """Remove a temporary file after a failed write, if it is there and can be removed."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes | memoryview, keep_previous: Path | None = None) -> None:
    """`path` gets `data` completely or not at all (temporary file, fsync, rename, fsync of the directory).

    With `keep_previous`, the file `path` held (if any) is renamed there once the new content is
    complete on disk, so a crash at any moment leaves at least one complete file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as err:
        discard(tmp)
        raise write_error(path, err) from err
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # exists, owned by someone else
        return True
    return True


def read_lock(path: Path) -> tuple[int, str, str]:
    """(pid, host, since) of the lock file `path`; FileNotFoundError without one, ValueError,
    KeyError or TypeError when it is garbled."""
    owner = json.loads(Path(path).read_text())
    return int(owner["pid"]), str(owner["host"]), str(owner.get("since", "?"))


def lock_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) of the lock file `path`'s owner, when there is one that may be alive: on this host
    a live process, on another host any (it cannot be checked from here; `FileLock` refuses it too).
    None when there is no lock, its owner on this host is dead, or it cannot be read."""
    try:
        pid, host, _ = read_lock(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, host) if host != socket.gethostname() or pid_alive(pid) else None


class FileLock:
    """An exclusive lock file `path` with {"pid", "host", "since"}; `acquire()` refuses a live owner.

    Usable as a context manager. `release()` removes the file only if this process still owns it.
    """

    def __init__(self, path: Path, what: str = "") -> None:
        self.path, self.what = Path(path), what or str(Path(path).parent)
        self.owned = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        # The content is complete before the lock appears: written to a file of this process, then
        # hard-linked to the lock's name, which fails if the lock exists (atomic, also over NFS).
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            atomic_write_bytes(tmp, json.dumps(me).encode())
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    self._take_over_if_stale()
                    continue
                except OSError as err:
                    raise write_error(self.path, err) from err
                self.owned = True
                return
        finally:
            discard(tmp)
        raise LockedError(f"could not take the lock {self.path} (it keeps reappearing); another process is starting on {self.what}")

    def _take_over_if_stale(self) -> None:
        """Remove the lock of a dead process on this host; refuse anything else, naming the owner."""
        try:
            pid, host, since = read_lock(self.path)
        except FileNotFoundError:
            return                                   # released meanwhile: try again
        except (ValueError, KeyError, TypeError, OSError):
            raise LockedError(f"{self.what} is locked by {self.path}, which is unreadable; if no process uses "
                              f"{self.what}, delete {self.path} and run again") from None
        if host == socket.gethostname() and not pid_alive(pid):
            self.path.unlink(missing_ok=True)        # stale: its owner died without releasing it
            return
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise LockedError(f"{self.what} is in use by process {pid} on {where} since {since} "
                          f"(lock file {self.path}); wait for it to finish, or if that process is gone, "
                          f"delete {self.path} and run again")

    def release(self) -> None:
        if not self.owned:
            return
        self.owned = False
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
