"""Reading and writing dataset files safely: paths kept inside their root, images decoded
with a clear error, label PNGs checked, outputs written atomically."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from PIL import Image

from boxseg.data.classes import IGNORE, voc_palette
from boxseg.errors import DataError, NoSpace
from boxseg.faults import failpoint


def resolve_inside(root: Path, relative: str, source: str | Path) -> Path:
    """`root / relative`, refusing absolute paths and anything that escapes `root`.

    `source` names the file the path came from (a split list, a COCO JSON) for the error.
    Symlinks are resolved before the check, so a link pointing outside is refused too.
    """
    if "\0" in relative:
        raise DataError(source, f"path {relative[:80]!r} holds a NUL byte")
    if not relative or os.path.isabs(relative) or relative.startswith(("/", "\\")):
        raise DataError(source, f"path {relative!r} is absolute or empty; expected a path inside {root}")
    root_real = Path(os.path.realpath(root))
    candidate = Path(os.path.realpath(root / relative))
    if candidate != root_real and root_real not in candidate.parents:
        raise DataError(source, f"path {relative!r} escapes the dataset root {root}")
    return candidate


def max_pixels() -> int:
    """The largest image boxseg decodes, in pixels: $BOXSEG_MAX_PIXELS, default 40 million
    (6,300 x 6,300; VOC and COCO images are under 0.5 million). Checked from the header,
    before any pixel is decoded."""
    try:
        return int(os.environ.get("BOXSEG_MAX_PIXELS", 40_000_000))
    except ValueError:
        return 40_000_000


def check_pixels(img: Image.Image, path: Path) -> None:
    w, h = img.size
    if w * h > max_pixels():
        raise DataError(path, f"refused as a decompression bomb or an oversized image: {w}x{h} = {w * h:,} pixels, "
                              f"over the limit of {max_pixels():,} (BOXSEG_MAX_PIXELS)")


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG file's bytes, its header checked (size within `max_pixels`, a complete 8-bit
    greyscale or colour JPEG) but not decoded: for a decoder on the model's device.
    `shape` is the decoded image's, (H, W, 3)."""
    path: Path
    data: bytes
    shape: tuple[int, int, int]


def read_image(path: Path, encoded_jpeg: bool = False) -> np.ndarray | EncodedJpeg:
    """Decode an image file to uint8 RGB (H, W, 3).

    Greyscale, palette, CMYK and RGBA are converted to RGB; 16-bit images are scaled to
    8 bits. Pillow's decompression-bomb guard stays on. Errors name the file. A complete
    8-bit greyscale or colour JPEG is decoded by OpenCV (`_decode_jpeg`: the same pixels,
    ~40% faster at VOC's 500 x 375); everything else, and any JPEG OpenCV refuses, by Pillow.
    With `encoded_jpeg`, such a JPEG is returned undecoded instead (`EncodedJpeg`).
    """
    if not path.is_file():  # (a FIFO or a device is not read: it could block or never end)
        raise DataError(path, "image file is missing")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise DataError(path, "image file is empty (0 bytes)")
            # read whole for the JPEG path, except a file too large for any sane image: streamed
            data = f.read() if size <= _READ_WHOLE else None
            with Image.open(f if data is None else io.BytesIO(data)) as img:
                check_pixels(img, path)
                if encoded_jpeg and data is not None and _plain_jpeg(data, img):
                    return EncodedJpeg(path, data, (img.size[1], img.size[0], 3))
                fast = _decode_jpeg(data, img) if data is not None else None
                if fast is not None:
                    return fast
                img.load()
                return image_to_rgb(img, path)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(path, f"refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode image: {e}") from None


_READ_WHOLE = 256 << 20  # bytes


def _decode_jpeg(data: bytes, img: Image.Image) -> np.ndarray | None:
    """The pixels of a JPEG through OpenCV, or None where Pillow must decode it. Both link
    libjpeg-turbo with its defaults (integer DCT, fancy upsampling), so a baseline or
    progressive 8-bit Y or YCbCr JPEG decodes to the same bytes (tests/test_files.py checks
    subsamplings, progressive, greyscale and odd sizes); Pillow's per-image Python and copies
    are what OpenCV saves. Not taken: other modes (CMYK, ...: Pillow converts them its own
    way), a file without the end-of-image marker at its end (Pillow refuses a truncated file
    where libjpeg would fill in grey), anything OpenCV cannot decode. EXIF orientation is
    ignored, as Pillow does."""
    if not _plain_jpeg(data, img):
        return None
    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if out is None or out.dtype != np.uint8 or out.shape != (img.size[1], img.size[0], 3):
        return None
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def _plain_jpeg(data: bytes, img: Image.Image) -> bool:
    """An 8-bit greyscale or colour JPEG that ends with its end-of-image marker."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and data.endswith(b"\xff\xd9")


def read_image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding its pixels. Errors name the file."""
    if not path.is_file():
        raise DataError(path, "image file is missing")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode image: {e}") from None
    return h, w


def image_to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        scale = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        grey = np.clip(arr * 255 // scale, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        raise DataError(path, "floating-point images are not supported")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def read_label(path: Path, num_classes: int, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label PNG (palette or greyscale) to uint8 (H, W) with values in {0..num_classes-1, 255}.

    An RGB label, a value outside that set or a size different from the image is an error
    naming the file.
    """
    if not path.is_file():
        raise DataError(path, "label file is missing")
    try:
        with Image.open(path) as img:
            check_pixels(img, path)
            img.load()
            if img.mode not in ("P", "L"):
                raise DataError(path, f"label PNG is in mode {img.mode}; expected palette (P) or greyscale (L) indices")
            label = np.asarray(img, dtype=np.uint8).copy()
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(path, f"refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode label PNG: {e}") from None
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE)]
    if bad.size:
        raise DataError(path, f"label values {bad.tolist()} outside 0..{num_classes - 1} and {IGNORE}")
    if expected_hw is not None and label.shape != tuple(expected_hw):
        raise DataError(path, f"label size {label.shape[1]}x{label.shape[0]} differs from image size "
                              f"{expected_hw[1]}x{expected_hw[0]}")
    return label


def read_list(path: Path) -> list[str]:
    """Read an ImageSets-style list: one id per line; blank lines ignored; duplicates are an error."""
    if not path.is_file():
        raise DataError(path, "split list is missing")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is not part of the first id
    except UnicodeDecodeError as e:
        raise DataError(path, f"split list is not UTF-8 text: {e}") from None
    ids = [line.strip().split()[0] for line in text.splitlines() if line.strip()]
    seen: set[str] = set()
    dups = sorted({i for i in ids if i in seen or seen.add(i)})
    if dups:
        raise DataError(path, f"duplicate ids in split list: {dups[:5]}{' ...' if len(dups) > 5 else ''}")
    return ids


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once at import: os.umask is process-wide and writes run in threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    Readers never see a half-written file under the final name; a crash leaves at most a
    hidden `.tmp` file that the next writer ignores.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        failpoint(f"write:{path.name}")
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise NoSpace(path) from None
        raise
    except RuntimeError:  # torch.save reports a full disk as "unexpected pos" (a RuntimeError)
        if _disk_full(path.parent):
            raise NoSpace(path) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def lock_folder(folder: Path, what: str):
    """Take an exclusive lock on `folder/.lock` for the life of the process (the returned file
    object holds it; the OS releases it when the process ends, killed or not). A second
    process gets a DataError naming the holder's pid."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise DataError(folder, f"in use by another {what} (pid {holder}); wait for it or choose another folder") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def file_digest(path: Path) -> str:
    """sha256 of a file's content, hex."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _disk_full(folder: Path) -> bool:
    import shutil

    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def output_folder(path: Path, option: str = "--out") -> Path:
    """Make `path` an output folder or say why it cannot be one (a file, not creatable, not
    writable)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(path, f"{option} names a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(path, f"cannot create the output folder: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(path, "the output folder is not writable")
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`write_files_atomic` for one file (fsynced, renamed over `path`)."""
    write_files_atomic([(path, data)])


def _libc_syncfs():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError, TypeError):  # not Linux
        return None


_SYNCFS = _libc_syncfs()


def write_files_atomic(items: Sequence[tuple[Path, bytes]]) -> None:
    """Write several files, each atomically (a temporary file beside it, renamed over it).
    Several are made durable by one filesystem sync (Linux `syncfs`) before the renames
    instead of one fsync a file: on the CI machine's ext4 0.1 ms a file against 0.35-0.5 ms
    (batches of 8 to 64); one file, or where `syncfs` is missing or fails, is fsynced.
    Renamed in the given order, so a kill leaves each file whole or absent, and a later one
    never without an earlier one (an image's instance masks before its PNG). A full disk
    raises NoSpace naming the file being written."""
    temps: list[tuple[str, Path]] = []
    path = Path(items[0][0]) if items else None
    try:
        for path, data in items:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                failpoint(f"write:{path.name}")
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
                if len(items) == 1:
                    os.fsync(f.fileno())
        if len(temps) > 1 and not _synced(temps[0][0]):
            for tmp, path in temps:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        for tmp, path in temps:
            os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise NoSpace(path) from None
        raise
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _synced(some_file: str) -> bool:
    """syncfs on the filesystem holding `some_file`; False where there is none or it fails."""
    if _SYNCFS is None:
        return False
    fd = os.open(some_file, os.O_RDONLY)
    try:
        return _SYNCFS(fd) == 0
    finally:
        os.close(fd)


_PALETTE = bytes(voc_palette())


def encode_label_png(label: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) label map as a VOC-palette PNG (the palette as bytes and the
    pixels by frombuffer: the same file, 70 against 95 us at 130 x 120)."""
    label = np.ascontiguousarray(label, dtype=np.uint8)
    img = Image.frombuffer("P", (label.shape[1], label.shape[0]), label, "raw", "P", 0, 1)
    img.putpalette(_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_label_png(path: Path, label: np.ndarray) -> None:
    write_bytes_atomic(path, encode_label_png(label))


def write_jpeg(path: Path, image: np.ndarray, quality: int = 92) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    write_bytes_atomic(path, buf.getvalue())


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, int]:
    """Clip float boxes (N, 4) x0,y0,x1,y1 to the image; returns the boxes and how many changed."""
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, height)
    changed = int(np.any(clipped != boxes, axis=1).sum())
    return clipped, changed


def check_boxes(boxes: np.ndarray, width: int, height: int, path: Path,
                names: Sequence[str] | None = None) -> None:
    """Raise DataError for a box with x0 >= x1 or y0 >= y1, or lying wholly outside the image."""
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        what = f"box {i}" + (f" ({names[i]})" if names is not None else "")
        if not np.all(np.isfinite([x0, y0, x1, y1])):
            raise DataError(path, f"{what} has non-finite coordinates")
        if x0 > x1 or y0 > y1:
            raise DataError(path, f"{what} has min > max: {[x0, y0, x1, y1]}")
        if x0 == x1 or y0 == y1:
            raise DataError(path, f"{what} has zero area: {[x0, y0, x1, y1]}")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise DataError(path, f"{what} {[x0, y0, x1, y1]} lies outside the {width}x{height} image")
