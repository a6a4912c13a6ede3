"""CPU threads: as many as the CPUs this process may use, across the main process and its
workers. And the heap: freed memory kept for reuse (`retain_freed_memory`); and MKL's
vector maths resolved before threads race for it (`resolve_mkl_vml`).

torch's default is the machine's core count, whatever the process's CPU affinity or its
container's CPU quota allow; with more threads than CPUs, every parallel region waits for
its slowest thread, and any other busy process makes a run many times slower (measured on
a 2-core machine: a SegNet1 stage 35 s -> 989 s with one other busy process)."""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path


def cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs allowed by the cgroup v2 quota (`quota period` in cpu.max; `max` = none)."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may run on: its affinity, capped by the cgroup quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max)
    if limit is not None:
        n = min(n, max(1, math.floor(limit)))
    return max(1, n)


def configure_threads(threads: int | None = None, workers: int = 0) -> int:
    """Set torch's intra-op threads for the main process: `threads` if given, else the
    available CPUs less one per DataLoader worker (each worker runs one thread), at least 1;
    and keep freed heap memory for reuse (`retain_freed_memory`); resolve MKL's vector maths
    (`resolve_mkl_vml`); run OpenCV on one thread (`one_opencv_thread`). Returns the number set."""
    import torch

    retain_freed_memory()
    resolve_mkl_vml()
    one_opencv_thread()

    n = threads if threads is not None else max(1, available_cpus() - max(0, workers))
    if n < 1:
        raise ValueError(f"--threads must be >= 1, not {n}")
    torch.set_num_threads(n)
    return n


def one_opencv_thread() -> None:
    """OpenCV on one thread in this process and the workers it forks. boxseg's parallelism is
    its own (torch's threads, decoder and writer threads or processes, model streams); with
    OpenCV's default, a thread per core in each of many worker processes, a resize splits
    into per-core pieces that compete with every other worker's (2-core check, medium images
    letterboxed to 512: the same 1.3 ms an image, 24% more CPU time on 2 threads than on 1).
    mmcv sets the same for its workers. Set here in the parent, before any fork: a forked
    worker must not call cv2.setNumThreads itself, which waits forever on the parent's
    OpenCV threads, absent in the child (tested)."""
    import cv2

    cv2.setNumThreads(1)


# the float unary functions ATen hands to MKL's VML on CPU (aten/src/ATen/cpu/vml.h)
_VML_FUNCTIONS = ("abs", "acos", "asin", "atan", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "lgamma",
                  "log", "log10", "log1p", "log2", "sin", "sinh", "sqrt", "tan", "tanh", "trunc")


def resolve_mkl_vml() -> None:
    """Call each of them once, in this thread, on one element of float32 and of float64.
    oneMKL 2024.2 (in torch 2.13's CPU wheel) picks each VML function's kernel on its first
    call; when that first call comes from several intra-op threads at once, one thread can
    run a low-accuracy kernel over its whole chunk (pytorch/pytorch#188792, open). Seen
    here: in about 1 process in 4, a fresh process's first `torch.exp` over 10,800 floats on
    2 threads was off by up to 1.5e-4 relative in its second half (6e-8 otherwise), and a
    first `log` by 4e-5 absolute; after this, 16 processes of 16 were accurate. Cheap
    (microseconds) and idempotent."""
    import torch

    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in _VML_FUNCTIONS:
            fn = getattr(torch, name, None)
            if fn is not None:
                fn(x)


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit
TRIM_THRESHOLD = 1 << 30


def retain_freed_memory() -> bool:
    """glibc: serve allocations up to 32 MiB from the heap and keep up to 1 GiB of freed heap
    memory instead of handing it back to the kernel. Without this, glibc's adaptive
    thresholds return the top of the heap whenever more than twice the largest recent block
    is free, and the next forward pass faults every page back in: the tiny SegNet2 at batch
    64 took ~8,000 page faults a call alone and ~13,000-15,000 inside boxseg-propose, and ran
    ~20% faster without them (2-core CPU; README, "CPU threads"). Left alone where the user set
    MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_THRESHOLD_, or where this is not glibc. Returns
    whether it was set."""
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # both, or glibc's adaptive mmap threshold stops at its 128 KiB default
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
