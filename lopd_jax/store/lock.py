"""The one exclusive lock of lopd_jax: one writer per RolloutStore (``STORE/.writer.lock``), one trainer per run
directory (``RUN/.lopd_train.lock``) and one pipeline per stages run directory (``RUN/.lopd_pipeline.lock``).

How it works. The lock file is opened (created if absent) and locked with ``flock(LOCK_EX | LOCK_NB)``; it holds
its holder's host, pid, start time and command line (for the messages only: the kernel's lock is the truth). The
kernel drops the lock when the holder exits, however it exits, so a crashed holder never blocks the next one: the
next one takes over and warns, naming the dead holder (a clean release empties the record). A second holder while
the first is alive fails at once with one line naming the holder. The lock file is never deleted by this module.

Exclusivity that a deleted or replaced file cannot defeat. ``flock`` locks an inode, not a name: if someone deletes
``.writer.lock`` (or replaces it by a copy), a second process creates and locks a new inode under the same name and
both "hold the lock". So the lock remembers the inode it locked (``st_dev``, ``st_ino``), and ``verify()`` checks
that the path still names it. Acquiring verifies after locking (and retries if the name moved meanwhile), and every
publication verifies first: a store commit (``RolloutWriter.flush``, before it writes data and again before it
replaces the manifest), and the trainer's metric rows, checkpoints and export. A holder whose file was deleted or
replaced stops with ``LockLost`` (one line) at its next publication, its last commit intact; the newcomer, which
holds the file the name now points to, goes on. (Between the check and the rename of the manifest there are
microseconds in which a newcomer could commit too; the window is that, not a whole run.)

What it guarantees where:

- local disks (ext4, xfs, tmpfs, ...): exclusive among all processes of the host.
- NFS (v3 with lockd, v4): Linux's NFS client implements ``flock`` as a whole-file POSIX lock on the server, so the
  lock is exclusive across clients. Mounted with ``nolock`` or ``local_lock=flock|all`` the lock is local to each
  client: ``acquire`` refuses such a mount (one line naming the mount and its option).
- Lustre: ``flock`` is cluster-wide only with the client mount option ``-o flock``; ``-o localflock`` makes it
  per-node and the default (``noflock``) makes it fail. ``acquire`` refuses a Lustre mount without ``flock``.
- GPFS / IBM Storage Scale, CephFS, BeeGFS: their clients forward ``flock`` to the cluster's lock manager; lopd_jax
  trusts them (not tested here). The inode check above holds on every filesystem.
- a filesystem without ``flock`` (the call fails with ENOLCK, EOPNOTSUPP, ENOSYS or EINVAL): ``acquire`` refuses
  with one line naming the filesystem; nothing is written. There is no fallback that would pretend exclusivity.

Stores on other kvstores (``memory://``, ``gs://`` ...) have no lock: one writer at a time there is the caller's job.
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
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}


class LockError(StoreError):
    """The lock is held by another process or cannot be taken; the message names the path and the holder."""


class LockLost(LockError):
    """The lock file was deleted or replaced while held: another process may hold the name's new file now."""


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


def mount_of(path: str, mounts: str = "/proc/self/mounts") -> tuple[str, str, set[str]] | None:
    """(mount point, filesystem type, options) of the mount holding ``path`` (None where /proc is absent)."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            rows = [line.split() for line in f]
    except OSError:
        return None
    real, best = os.path.realpath(path), None
    for row in rows:
        if len(row) < 4:
            continue
        point = row[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, row[2], set(row[3].split(",")))
    return best


def check_mount(path: str, where: str, mounts: str = "/proc/self/mounts") -> None:
    """Refuse a mount on which ``flock`` is only local to each node (see the module docstring)."""
    found = mount_of(path, mounts)
    if found is None:
        return
    point, fstype, opts = found
    local = None
    if fstype == "lustre" and "flock" not in opts:
        local = "localflock" if "localflock" in opts else "no 'flock' option"
    elif fstype.startswith("nfs") and ("nolock" in opts or {"local_lock=flock", "local_lock=all"} & opts):
        local = "nolock" if "nolock" in opts else sorted({"local_lock=flock", "local_lock=all"} & opts)[0]
    if local is not None:
        raise LockError(
            f"{where}: {point} is a {fstype} mount with {local}: its file locks are local to each node, so two "
            f"nodes could both write here; remount it with cluster-wide locks (Lustre: -o flock; NFS: without "
            "nolock / local_lock) or use another directory; nothing was written"
        )


class FileLock:
    """An exclusive lock on one lock file, verified by inode (see the module docstring)."""

    def __init__(self, fd: int, path: str, where: str, holder: str = "writer"):
        self._fd: int | None = fd
        self.path, self.where, self.holder = path, where, holder
        st = os.fstat(fd)
        self._inode = (st.st_dev, st.st_ino)

    @classmethod
    def acquire(
        cls, path: str | os.PathLike, where: str, holder: str = "writer", thing: str = "this store"
    ) -> FileLock:
        """Lock ``path`` for this process or raise LockError naming ``where`` and the current holder (``holder``
        of ``thing``: "writer" of "this store", "trainer" of "this run directory", for the messages)."""
        path = os.fspath(path)
        check_mount(os.path.dirname(path) or ".", where)
        for _ in range(8):  # the name can move between open and flock (deleted / replaced): lock what it names
            fd = _open(path, where, thing)
            _flock(fd, path, where, holder, thing)
            lock = cls(fd, path, where, holder)
            if lock._names_ours():
                lock._take_over()
                return lock
            lock._close()
        raise LockError(f"{where}: the lock file {path} keeps being replaced; is something deleting it?")

    def _names_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:  # deleted, or a stale NFS handle (ESTALE): either way not provably ours
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def verify(self, what: str = "commit") -> None:
        """Raise LockLost unless the lock is held and its path still names the locked file; called before every
        publication (``what``: what is about to be published, for the message)."""
        if self._fd is None:
            raise LockLost(f"{self.where}: the lock {self.path} was released; refusing to {what}")
        if not self._names_ours():
            raise LockLost(
                f"{self.where}: the lock file {self.path} was deleted or replaced while this process held it, so "
                f"another process may be writing here now; stopped before this {what} (everything up to the last "
                "one is kept). Never delete lock files: a lock is free when its holder has exited"
            )

    def _take_over(self) -> None:
        previous = _read_record(self._fd)
        if previous:
            print(
                f"warning: {self.where}: took over the {self.holder} lock of {describe_holder(previous)} (lock "
                f"{self.path}), which {_stale_note(previous)}; continuing from its last commit",
                file=sys.stderr,
                flush=True,
            )
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        record["argv"] = sys.argv
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, json.dumps(record).encode("utf-8"))
        os.fsync(self._fd)

    def fileno(self) -> int:
        """The locked descriptor, for a child process that should hold the lock as long as it runs (``pass_fds``:
        an inherited descriptor shares the flock, which the kernel drops when the last holder closes it)."""
        if self._fd is None:
            raise LockError(f"{self.where}: the lock {self.path} is not held")
        return self._fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def record(self) -> dict | None:
        """The holder record now in the locked file."""
        return _read_record(self._fd) if self._fd is not None else None

    def release(self) -> None:
        """Empty the record (a clean exit leaves no stale-lock warning) and unlock. Idempotent."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # the record only feeds a warning; the unlock below is what matters
        finally:
            self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:  # a holder dropped without release (e.g. after an exception) unlocks too
        self.release()


def _open(path: str, where: str, thing: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LockError(f"{where}: cannot write to {thing} ({e.strerror}: {path}); nothing changed") from None


def _flock(fd: int, path: str, where: str, holder: str, thing: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        record = _read_record(fd)
        os.close(fd)
        if e.errno in _BUSY:
            raise LockError(
                f"{where}: another {holder} holds {thing}: {describe_holder(record)} (lock {path}); one {holder} "
                "at a time: wait for it to finish or stop it"
            ) from None
        if e.errno in _NO_FLOCK:
            found = mount_of(os.path.dirname(path) or ".")
            fs = f"{found[1]} at {found[0]}" if found else "this filesystem"
            raise LockError(
                f"{where}: cannot lock {path}: {fs} does not support flock ({e.strerror}); lopd_jax needs a "
                "filesystem with file locks to keep one writer per store / one trainer per run; nothing was written"
            ) from None
        raise LockError(f"{where}: cannot lock {path} ({e.strerror})") from None


def store_lock(directory: str, where: str) -> FileLock:
    """The writer lock of the local store in ``directory``."""
    return FileLock.acquire(os.path.join(directory, LOCK_FILE), where, "writer")


__all__ = [
    "LOCK_FILE",
    "FileLock",
    "LockError",
    "LockLost",
    "check_mount",
    "describe_holder",
    "pid_alive",
    "store_lock",
]
