"""Helpers of the pipelines: DataLoader worker processes that end with their parent and, for
background work, yield the CPU to it; chunks of work done ahead by threads (`in_threads`)."""

from __future__ import annotations

import ctypes
import itertools
import os
import select
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

from boxseg import threads

T = TypeVar("T")

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


def die_with(pid: int) -> None:
    """This process gets SIGKILL when process `pid` ends: a daemon thread waits on a pidfd of
    it (Linux >= 5.3; elsewhere it polls every second). For a worker forked by a forkserver,
    whose parent is the server and not the command: the server lives as long as any of its
    children, so after a kill of the command the server and the workers were both left
    behind (~180 MB each), each waiting for the other."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3 (or already gone: the poll sees it)
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has ended
        else:
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="boxseg-die-with", daemon=True).start()


def foreground_worker(_: int, command: int | None = None) -> None:
    """A worker's set-up: it ends with its parent, and with `command` (a pid) where that is
    not its parent (a worker forked by a forkserver). A worker forked from the command has
    the command's OpenCV setting (`boxseg.threads.one_opencv_thread`); one forked by the
    forkserver sets it here, which is safe there: the server only imports and forks, so it
    has no OpenCV threads for the call to wait on."""
    die_with_parent()
    if command is not None and command != os.getppid():
        die_with(command)
        threads.one_opencv_thread()


def background_worker(_: int, command: int | None = None) -> None:
    foreground_worker(_, command)
    lower_priority()


def default_helpers(processes: bool) -> int:
    """boxseg-propose's decoders when --workers is not given, and its PNG writers (and
    boxseg-eval's decode threads, sized alike). Threads (on CPU): 2. For the decoders, as before
    (on the 2-core machine 1 thread was no better: in-process paired A/Bs gave -5 and -7 ms
    a run of ~0.44 s, but `boxseg-bench --e2e` in alternation, 4 runs each, 59, 59, 60, 56%
    with 2 against 57, 58, 57, 59% with 1). Processes (on CUDA): half the CPUs, 2 to 8 (the
    old default of 2 could not feed the H200 target of ~1,750 images/s: decoding medium
    images letterboxed to 512 takes ~1.3 ms an image, measured on the 2-core machine, so ~3
    cores; not measured on a GPU; the GPU check names its own count, 12 of 16)."""
    if not processes:
        return 2
    return min(8, max(2, threads.available_cpus() // 2))


# boxseg-propose's and boxseg-bench's --decoders and --writers: what its decode --workers and
# its PNG writers are: auto (processes on CUDA, threads on CPU), threads, processes forked from
# this process, or forked from a forkserver
DECODERS = WRITERS = ("auto", "threads", "processes", "forkserver")


def _helper_options(kind: str, role: str, prefix: str) -> dict:
    if kind not in DECODERS:
        raise ValueError(f"{role} must be one of {', '.join(DECODERS)}, not {kind!r}")
    return {f"{prefix}_processes": None if kind == "auto" else kind != "threads",
            f"{prefix}_start": "forkserver" if kind == "forkserver" else "fork"}


def decoder_options(kind: str) -> dict:
    """`boxseg.propose.propose`'s decoder arguments for a `--decoders` choice (DECODERS)."""
    return _helper_options(kind, "decoders", "decode")


def writer_options(kind: str) -> dict:
    """`boxseg.propose.propose`'s writer arguments for a `--writers` choice (WRITERS)."""
    return _helper_options(kind, "writers", "writer")


def in_threads(make: Callable[[range], T], n: int, chunk: int, workers: int, background: bool = True,
               name: str = "boxseg-decode") -> Iterator[T]:
    """`make(ks)` for the consecutive ranges of `chunk` indices of 0..n-1, done by `workers`
    threads at most 2 x workers ranges ahead (a DataLoader's prefetch), yielded in order; an
    error in `make` is raised here, at its range. `background`: at the lowest priority, so
    they fill the gaps rather than slow the model's parallel regions. Closing the iterator
    cancels what has not started and waits for the rest."""
    ex = ThreadPoolExecutor(max(1, workers), thread_name_prefix=name,
                            initializer=lower_priority if background else None)
    ranges = (range(a, min(a + chunk, n)) for a in range(0, n, chunk))
    ahead = deque(ex.submit(make, ks) for ks in itertools.islice(ranges, 2 * max(1, workers)))
    try:
        while ahead:
            f = ahead.popleft()
            ks = next(ranges, None)
            if ks is not None:
                ahead.append(ex.submit(make, ks))
            yield f.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
