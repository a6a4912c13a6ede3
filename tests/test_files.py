"""Atomic writes of outputs (boxseg.data.files)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from boxseg.data import files
from boxseg.data.files import write_files_atomic


@pytest.mark.parametrize("syncfs", [True, False])
def test_write_files_atomic_writes_every_file_whole_with_the_usual_mode(tmp_path, monkeypatch, syncfs):
    """One filesystem sync a batch (Linux syncfs), or an fsync a file where there is none:
    the same files, bytes and modes, no temporary left."""
    calls = []
    if syncfs:
        real = files._SYNCFS
        monkeypatch.setattr(files, "_SYNCFS", lambda fd: calls.append(fd) or real(fd))
    else:
        monkeypatch.setattr(files, "_SYNCFS", None)
        fsync = os.fsync
        monkeypatch.setattr(files.os, "fsync", lambda fd: calls.append(fd) or fsync(fd))
    items = [(tmp_path / "sub" / f"{k}.png", bytes([k]) * (100 + k)) for k in range(5)]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "2.png").write_bytes(b"old")  # replaced
    write_files_atomic(items)
    assert len(calls) == (1 if syncfs else 5)
    umask = os.umask(0)
    os.umask(umask)
    for path, data in items:
        assert path.read_bytes() == data and (path.stat().st_mode & 0o777) == 0o666 & ~umask
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [f"{k}.png" for k in range(5)]


def test_a_failed_batch_leaves_no_temporary_and_renames_nothing(tmp_path, monkeypatch):
    """A write error before the renames: no file of the batch appears, no temporary stays."""
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files, "_SYNCFS", full)
    with pytest.raises(files.NoSpace):
        write_files_atomic([(tmp_path / "a.png", b"a"), (tmp_path / "b.png", b"b")])
    assert list(tmp_path.iterdir()) == []


def test_a_kill_inside_a_batch_leaves_earlier_files_absent_not_partial(tmp_path):
    """Killed while writing the third file of a batch: nothing under a final name (the batch
    is renamed only after its sync), at most hidden temporaries."""
    code = ("import sys; from pathlib import Path; from boxseg.data.files import write_files_atomic; "
            "write_files_atomic([(Path(sys.argv[1]) / f'{k}.png', b'x' * 1000) for k in range(5)])")
    env = {**os.environ, "BOXSEG_FAILPOINT": "write:2.png"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, timeout=60)
    assert r.returncode == -9, r.stderr
    names = [p.name for p in tmp_path.iterdir()]
    assert names and all(n.startswith(".") and n.endswith(".tmp") for n in names)
