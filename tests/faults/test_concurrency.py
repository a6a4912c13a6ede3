"""Concurrency: two boxseg-propose processes writing into one folder (each PNG is written
atomically, and identical content makes the last rename harmless), one of them killed while
the other runs on; and a second boxseg-train on a run folder in use is refused by a lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from .conftest import assert_no_partial_files, run_cli, train_args
from .test_kills import _assert_same_folder, _propose_args

FAILPOINT = "BOXSEG_FAILPOINT"


def _start(args, failpoint=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != FAILPOINT}
    if failpoint:
        env[FAILPOINT] = failpoint
    return subprocess.Popen([sys.executable, "-m", "boxseg.cli.propose", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("five", [False, True], ids=["4 channels", "5 channels"])
def test_two_proposers_on_one_folder(world, reference_run, tmp_path, five):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run_cli("propose", *_propose_args(reference_run, world, ref, five)).returncode == 0
    procs = [_start(_propose_args(reference_run, world, out, five)) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert_no_partial_files(out)
    assert not [p for p in out.rglob(".*.tmp")]
    _assert_same_folder(ref, out, "*.png")
    _assert_same_folder(ref, out, "instances/*.json")
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["images"] == len(list(ref.glob("*.png"))) and m["counts"]["failed"] == 0


def test_one_proposer_killed_while_another_finishes(world, reference_run, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run_cli("propose", *_propose_args(reference_run, world, ref, False)).returncode == 0
    victim = _start(_propose_args(reference_run, world, out, False), failpoint="propose.batch@2")
    other = _start(_propose_args(reference_run, world, out, False))
    victim.communicate(timeout=300)
    other.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL and other.returncode == 0
    assert_no_partial_files(out)
    _assert_same_folder(ref, out, "*.png")


def test_second_trainer_on_a_busy_run_folder_is_refused(world, tmp_path):
    """The holder is a process that takes the run folder's lock as boxseg-train does and waits
    (a real trainer here might finish before the second one starts)."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from boxseg.data.files import lock_folder; "
                               f"lock = lock_folder(__import__('pathlib').Path({str(out)!r}), 'boxseg-train'); "
                               "print('locked', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    r = run_cli("train", *train_args(world, out))
    assert r.returncode == 3 and f"{out}: in use by another boxseg-train (pid {holder.pid})" in r.stderr, r.stderr
    assert not (out / "stages").exists()
    holder.kill()  # the lock dies with its holder, however it ends
    holder.wait()
    r = run_cli("train", *train_args(world, out))
    assert r.returncode == 0, r.stderr
