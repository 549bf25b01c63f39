"""One writer per RolloutStore: an exclusive lock file inside a local store, held for the writer's whole life.

``STORE/.writer.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) and holds its holder's host, pid,
start time and command line. The kernel drops the lock when the holder exits, however it exits, so a crashed
writer never blocks the next one: the next writer takes the lock over and warns, naming the dead holder (its
record is still in the file; a clean release empties it). A second writer while the first is alive fails at once
with one line naming the holder. The lock file is never deleted, so two writers can never lock two different files
of the same name. Stores on other kvstores (``memory://``, ``gs://`` ...) have no lock: one writer at a time there
is the caller's job.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from lopd_jax.store.layout import StoreError

LOCK_FILE = ".writer.lock"


class LockError(StoreError):
    """The store is locked by another writer or cannot be written; the message names the store and the holder."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_record(fd: int) -> dict | None:
    """The holder record in the lock file (None when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        record = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"host": "?", "pid": "?", "note": "unreadable lock record"}
    return record if isinstance(record, dict) else None


def describe_holder(record: dict | None) -> str:
    if not record:
        return "an unknown process (empty lock record)"
    return f"pid {record.get('pid')} on host {record.get('host')} (since {record.get('since')})"


def _stale_note(record: dict) -> str:
    """Why a leftover record's holder no longer holds the lock (what a crash leaves behind)."""
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return "is no longer running" if not pid_alive(record["pid"]) else "no longer holds it (exited uncleanly)"
    return "no longer holds it"


class StoreLock:
    """The exclusive writer lock of one local store directory (see the module docstring)."""

    def __init__(self, fd: int, path: str):
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, directory: str, where: str) -> StoreLock:
        """Lock ``directory`` for this process or raise LockError naming ``where`` and the current holder."""
        path = os.path.join(directory, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LockError(f"{where}: cannot write to this store ({e.strerror}: {path}); nothing changed") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_record(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockError(f"{where}: cannot lock {path} ({e.strerror})") from None
            raise LockError(
                f"{where}: another writer holds this store: {describe_holder(holder)} (lock {path}); "
                "one writer per store: wait for it to finish or stop it"
            ) from None
        lock = cls(fd, path)
        lock._take_over(where)
        return lock

    def _take_over(self, where: str) -> None:
        previous = _read_record(self._fd)
        if previous:
            print(
                f"warning: {where}: took over the writer lock of {describe_holder(previous)}, which "
                f"{_stale_note(previous)}; the store continues at its last commit",
                file=sys.stderr,
                flush=True,
            )
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        record["argv"] = sys.argv
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, json.dumps(record).encode("utf-8"))
        os.fsync(self._fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the record (a clean exit leaves no stale-lock warning) and unlock. Idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the record only feeds a warning; the unlock below is what matters
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:  # a writer dropped without close (e.g. after an exception) unlocks too
        self.release()


__all__ = ["LOCK_FILE", "LockError", "StoreLock", "describe_holder", "pid_alive"]
