"""CPU threads follow the CPUs the process may use (affinity, cgroup quota), less one per worker."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from boxseg import threads


def test_cgroup_quota_is_read(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(f) == 1.5
    f.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(f) is None
    assert threads.cgroup_cpu_limit(tmp_path / "missing") is None


def test_available_cpus_is_affinity_capped_by_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert threads.available_cpus(f) == 4
    f.write_text("250000 100000\n")
    assert threads.available_cpus(f) == 2
    f.write_text("50000 100000\n")  # half a CPU: still one thread
    assert threads.available_cpus(f) == 1


def test_configure_threads_leaves_one_cpu_per_worker(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    try:
        assert threads.configure_threads(None, workers=3) == 5 and torch.get_num_threads() == 5
        assert threads.configure_threads(None, workers=20) == 1
        assert threads.configure_threads(2, workers=3) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_flag(world, tmp_path):
    from boxseg.cli.propose import main as propose_cli

    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(propose_cli, ["--method", "box", "--voc-root", str(world.voc_root), "--out",
                                             str(tmp_path / "o"), "--threads", "1"])
        assert r.exit_code == 0 and torch.get_num_threads() == 1, r.output
        r = CliRunner().invoke(propose_cli, ["--method", "box", "--voc-root", str(world.voc_root), "--out",
                                             str(tmp_path / "o"), "--threads", "0"])
        assert r.exit_code == 2 and "--threads" in r.output
    finally:
        torch.set_num_threads(before)


_FAULTS = """
import resource, sys
import numpy as np
from boxseg.threads import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == "retain" else False

def cycle():  # what a forward pass does: blocks of up to 16 MiB, written, then freed
    blocks = [np.ones(2 << 20) for _ in range(8)]
    del blocks

for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict | None = None) -> tuple[bool, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_without_page_faults():
    """glibc hands the top of the heap back after big blocks are freed, and the next pass
    faults every page in again; retained, the same blocks come back without a fault."""
    retained, faults = _faults("retain")
    if not retained:
        pytest.skip("not glibc: mallopt is not available")
    _, default = _faults("default")
    assert faults < 50
    assert default > 1000  # (4,600 on the CI machine): the test measures something


def test_freed_memory_setting_leaves_the_users_malloc_settings():
    retained, _ = _faults("retain", {"MALLOC_TRIM_THRESHOLD_": "1000000"})
    assert not retained


_FIRST_EXP = """
import sys
import numpy as np, torch
if sys.argv[1] == "resolved":
    from boxseg.threads import configure_threads
    configure_threads(2)
torch.set_num_threads(2)
x = -torch.rand(10800, generator=torch.Generator().manual_seed(0)) * 8
y = x.exp().numpy()
ref = np.exp(x.numpy().astype(np.float64))
print(float((np.abs(y - ref) / ref).max()))
"""


def test_every_command_resolves_mkl_vector_maths_before_threads_race_for_it():
    """A fresh process's first float exp on 2 threads ran a low-accuracy MKL kernel over one
    thread's chunk in about 1 process in 4 (pytorch/pytorch#188792): up to 1.5e-4 relative
    against 6e-8. After `configure_threads` (every command calls it) each of six fresh
    processes is accurate."""
    import subprocess
    import sys

    errors = [float(subprocess.run([sys.executable, "-c", _FIRST_EXP, "resolved"], capture_output=True, text=True,
                                   timeout=120, check=True).stdout) for _ in range(6)]
    assert max(errors) < 1e-6, errors


def _opencv_work(_):
    import cv2
    import numpy as np

    cv2.resize(np.zeros((1000, 1000, 3), np.uint8), (1500, 1500))  # OpenCV's parallel path
    return cv2.getNumThreads()


@pytest.mark.parametrize("init", ["foreground_worker", "background_worker"])
def test_commands_run_opencv_on_one_thread_and_forked_workers_do_not_hang(init):
    """Every command (configure_threads) runs OpenCV on one thread, and so do the workers it
    forks; a worker forked after the parent's OpenCV threads ran does not hang (a worker
    that called cv2.setNumThreads itself waited forever on them)."""
    import cv2
    import numpy as np
    from torch.utils.data import DataLoader

    from boxseg import workers

    def workers_report():
        return list(DataLoader(list(range(2)), batch_size=1, num_workers=1, collate_fn=_opencv_work, timeout=60,
                               worker_init_fn=getattr(workers, init), multiprocessing_context="fork"))

    before, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    try:
        cv2.setNumThreads(2)
        cv2.resize(np.zeros((1000, 1000, 3), np.uint8), (1500, 1500))  # the parent's OpenCV threads exist now
        assert workers_report() == [2, 2]  # forked with them: the worker starts and works (no hang)
        threads.configure_threads(torch_threads)
        assert cv2.getNumThreads() == 1
        assert workers_report() == [1, 1]
    finally:
        cv2.setNumThreads(before)
        torch.set_num_threads(torch_threads)


def test_forkserver_workers_run_opencv_on_one_thread():
    """A worker forked by the forkserver (boxseg-propose --decoders/--writers forkserver) is not
    a copy of the command, so it sets OpenCV's one thread itself."""
    import functools

    from torch.utils.data import DataLoader

    from boxseg import workers
    from boxseg.propose import _forkserver

    loader = DataLoader(list(range(2)), batch_size=1, num_workers=1, collate_fn=_opencv_work, timeout=120,
                        worker_init_fn=functools.partial(workers.foreground_worker, command=os.getpid()),
                        multiprocessing_context=_forkserver())
    assert list(loader) == [1, 1]
