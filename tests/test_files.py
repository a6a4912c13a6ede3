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


def _jpeg(arr, **kw) -> bytes:
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", **kw)
    return b.getvalue()


def _pillow_rgb(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("hw", [(375, 500), (121, 139), (1, 1), (17, 9)])
def test_jpegs_decode_to_pillows_pixels_through_opencv(tmp_path, hw, monkeypatch):
    """read_image's OpenCV path gives Pillow's bytes for every subsampling, progressive,
    optimised and greyscale JPEG (both libjpeg-turbo, integer DCT, fancy upsampling)."""
    import cv2
    import numpy as np
    from PIL import Image

    taken = []
    fast = files._decode_jpeg
    monkeypatch.setattr(files, "_decode_jpeg", lambda d, i: taken.append(1) or fast(d, i))
    rng = np.random.default_rng(hw[0])
    coarse = rng.integers(0, 256, (hw[0] // 8 + 2, hw[1] // 8 + 2, 3), dtype=np.uint8)
    arr = np.ascontiguousarray(cv2.resize(coarse, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC))
    arr[::3, ::5] = rng.integers(0, 256, arr[::3, ::5].shape, dtype=np.uint8)  # some sharp detail
    variants = [dict(quality=95), dict(quality=75, subsampling=0), dict(quality=75, subsampling=1),
                dict(quality=75, subsampling=2), dict(quality=90, progressive=True), dict(quality=40, optimize=True)]
    for k, kw in enumerate(variants):
        for mode in ("RGB", "L"):
            path = tmp_path / f"{k}{mode}.jpg"
            path.write_bytes(_jpeg(np.asarray(Image.fromarray(arr).convert(mode)), **kw))
            n = len(taken)
            got = files.read_image(path)
            assert len(taken) == n + 1 and got.dtype == np.uint8 and got.flags.writeable
            np.testing.assert_array_equal(got, _pillow_rgb(path), err_msg=f"{kw} {mode}")


def test_jpegs_opencv_does_not_take_decode_as_pillow_does(tmp_path):
    """Truncated: an error naming the file (libjpeg alone would fill in grey); CMYK, and bytes
    after the end marker: Pillow's pixels; an EXIF orientation: ignored, as by Pillow."""
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    data = _jpeg(arr, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(files.DataError, match=r"cut\.jpg: cannot decode image"):
        files.read_image(cut)
    (tmp_path / "trailing.jpg").write_bytes(data + b"\x00junk")
    (tmp_path / "cmyk.jpg").write_bytes(b"")
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(arr).save(tmp_path / "exif.jpg", "JPEG", quality=90, exif=exif.tobytes())
    for name in ("trailing.jpg", "cmyk.jpg", "exif.jpg"):
        got = files.read_image(tmp_path / name)
        np.testing.assert_array_equal(got, _pillow_rgb(tmp_path / name), err_msg=name)
    assert files.read_image(tmp_path / "exif.jpg").shape == (40, 60, 3)
    for bad, problem in ((tmp_path / "none.jpg", "image file is missing"), (tmp_path, "image file is missing")):
        with pytest.raises(files.DataError, match=problem):
            files.read_image(bad)


def test_a_file_too_large_to_read_whole_is_streamed_to_pillow(tmp_path, monkeypatch):
    import numpy as np

    arr = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    (tmp_path / "a.jpg").write_bytes(_jpeg(arr, quality=90))
    monkeypatch.setattr(files, "_READ_WHOLE", 100)
    monkeypatch.setattr(files, "_decode_jpeg", lambda d, i: pytest.fail("read whole"))
    np.testing.assert_array_equal(files.read_image(tmp_path / "a.jpg"), _pillow_rgb(tmp_path / "a.jpg"))
