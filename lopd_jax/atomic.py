"""Write, then rename: the one way a file written by lopd_jax appears (run records, manifests, provenance, plots'
data, the fingerprint cache).

A reader, a second process or a kill -9 mid-write sees the old file or the new one, never half of one: the bytes go
to a temporary file in the same directory (same filesystem, so the rename is atomic), are flushed to disk, and
``os.replace`` publishes them. A failed write (a full disk, a read-only directory) removes its temporary file and
raises; the old file is untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes, *, durable: bool = True) -> Path:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically; returns the path.

    ``durable`` fsyncs the data before the rename (a crash after the rename then never leaves an empty file). The
    file gets the permissions an ordinary ``open(path, "w")`` would (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
