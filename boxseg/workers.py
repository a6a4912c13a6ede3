"""DataLoader worker processes that end with their parent and, for background work, yield
the CPU to it."""

from __future__ import annotations

import ctypes
import os
import signal
import threading

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the thread that started it ends, so a killed
    run leaves no workers behind (they lingered for minutes, holding ~180 MB each)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        pass


def lower_priority(nice: int = 19) -> None:
    """This thread (or process) at a lower priority: decoders and writers fill the gaps
    instead of slowing the model's parallel regions."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not allowed: the usual priority
        pass


def before_fork() -> None:
    """glibc: hand the heap's free pages back to the kernel before forking workers. After a
    fork every page this process then writes is first copied (a copy-on-write fault); a
    page handed back costs a plain zero-fill instead, and the model's allocations reuse
    such pages all the time (boxseg-propose with forked decoders on the 2-core CPU: 0.98 ->
    0.82 s for the default world)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def one_opencv_thread() -> None:
    """OpenCV in this process on one thread. A worker process is one of many: with OpenCV's
    default (a thread per core in each of them) its resizes split into per-core pieces that
    compete with every other worker's (a 2-core check, medium images letterboxed to 512:
    the same 1.3 ms an image, with 24% more CPU time on 2 threads than on 1). The usual
    setting for DataLoader workers (mmcv and others do the same)."""
    import cv2

    cv2.setNumThreads(1)


def foreground_worker(_: int) -> None:
    die_with_parent()
    one_opencv_thread()


def background_worker(_: int) -> None:
    die_with_parent()
    lower_priority()
    one_opencv_thread()


# boxseg-propose's and boxseg-bench's --decoders: what its decode --workers are
DECODERS = ("auto", "threads", "processes", "forkserver")


def decoder_options(kind: str) -> dict:
    """`boxseg.propose.propose`'s decoder arguments for a `--decoders` choice (DECODERS):
    auto (processes on CUDA, threads on CPU), threads, DataLoader processes forked from this
    process, or forked from a forkserver."""
    if kind not in DECODERS:
        raise ValueError(f"decoders must be one of {', '.join(DECODERS)}, not {kind!r}")
    return {"decode_processes": None if kind == "auto" else kind != "threads",
            "decode_start": "forkserver" if kind == "forkserver" else "fork"}
