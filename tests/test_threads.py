"""CPU threads follow the CPUs the process may use (affinity, cgroup quota), less one per worker."""

from __future__ import annotations

import os

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
