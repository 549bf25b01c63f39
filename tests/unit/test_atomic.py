"""lopd_jax.atomic.write_atomic: the one write-then-rename every project file goes through."""

import os
import stat

import pytest

from lopd_jax.atomic import write_atomic


def test_replaces_the_file_whole_with_ordinary_permissions(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    old_umask = os.umask(0o022)
    try:
        write_atomic(path, "new ✓")
    finally:
        os.umask(old_umask)
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600: others on a cluster can read it
    write_atomic(path, b"\x00\x01", durable=False)
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]  # no temporary left beside it


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text("committed")

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "x" * 1000)
    assert path.read_text() == "committed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
