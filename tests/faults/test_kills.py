"""SIGKILL at chosen points of boxseg-train, boxseg-propose and boxseg-export (failpoints, see
boxseg/faults.py), and once at a moment chosen by a timer. After each kill: no file under
its final name is partial, the rerun finishes, and its outputs equal an uninterrupted run's
(weights bitwise, PNGs and ONNX byte for byte; CPU, --deterministic)."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


from .conftest import assert_no_partial_files, assert_same_run, run_cli, train_args as _train_args

TRAIN_POINTS = {
    "inside a SegNet2 stage": "step:segnet2_r1@3",
    "inside a SegNet1 stage (its last step)": "step:segnet1_r1@5",
    "inside a round-2 SegNet2 stage": "step:segnet2_r2@3",
    "between rounds": "round:2",
    "during a last.pt write": "write:last.pt@2",
    "during a final.pt write": "write:final.pt@2",
    "during a proposal PNG write": "write:synth_train_000003.png@1",
    "mid-batch while proposing": "propose.batch@2",
    "during a done.json write": "write:done.json@2",
}


@pytest.mark.parametrize("point", TRAIN_POINTS.values(), ids=TRAIN_POINTS.keys())
def test_train_killed_then_resumed_equals_uninterrupted(world, reference_run, tmp_path, point):
    out = tmp_path / "run"
    r = run_cli("train", *_train_args(world, out), failpoint=point)
    assert r.returncode == -signal.SIGKILL, f"the failpoint {point} was never reached:\n{r.stderr[-2000:]}"
    assert_no_partial_files(out)
    r = run_cli("train", *_train_args(world, out))
    assert r.returncode == 0, r.stderr
    if point.startswith("step:"):
        assert "resuming at iteration" in r.stdout + r.stderr
    assert_no_partial_files(out)
    assert_same_run(reference_run, out)


def test_train_killed_by_a_timer_then_resumed(world, reference_run, tmp_path):
    """A kill that lands wherever the process happens to be once SegNet1's first checkpoint exists."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "BOXSEG_FAILPOINT"}
    proc = subprocess.Popen([sys.executable, "-m", "boxseg.cli.train", *map(str, _train_args(world, out))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "stages" / "segnet1_source" / "last.pt").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run ended before the timer's kill"
    assert_no_partial_files(out)
    r = run_cli("train", *_train_args(world, out))
    assert r.returncode == 0, r.stderr
    assert_same_run(reference_run, out)


def _propose_args(reference_run: Path, world, out: Path, five: bool) -> list:
    stages = reference_run / "stages"
    model = ["--model", stages / "segnet2_r2" / "final.pt", "--segnet1", stages / "segnet1_r1" / "final.pt"] if five \
        else ["--model", stages / "segnet2_r1" / "final.pt"]
    return [*model, "--voc-root", world.voc_root, "--out", out, "--batch", "7", "--workers", "0", "--instances",
            "--device", "cpu"]


def _assert_same_folder(ref: Path, out: Path, pattern: str) -> None:
    names = sorted(p.relative_to(ref).as_posix() for p in ref.glob(pattern))
    assert names and names == sorted(p.relative_to(out).as_posix() for p in out.glob(pattern))
    match, mismatch, errors = filecmp.cmpfiles(ref, out, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


PROPOSE_POINTS = {
    "mid-batch (4 channels)": ("propose.batch@2", False),
    "mid-batch (5 channels)": ("propose.batch@3", True),
    "during a PNG write": ("write:synth_train_000005.png@1", False),
    "during an instance-mask write": ("write:synth_train_000009.json@1", True),
    "during the manifest write": ("write:manifest.json@1", False),
}


@pytest.mark.parametrize("point,five", PROPOSE_POINTS.values(), ids=PROPOSE_POINTS.keys())
def test_propose_killed_then_rerun_equals_uninterrupted(world, reference_run, tmp_path, point, five):
    ref, out = tmp_path / "ref", tmp_path / "out"
    r = run_cli("propose", *_propose_args(reference_run, world, ref, five))
    assert r.returncode == 0, r.stderr
    r = run_cli("propose", *_propose_args(reference_run, world, out, five), failpoint=point)
    assert r.returncode == -signal.SIGKILL, f"the failpoint {point} was never reached:\n{r.stderr[-2000:]}"
    assert not (out / "manifest.json").exists()
    n_before = len(list(out.glob("*.png")))
    assert_no_partial_files(out)
    r = run_cli("propose", *_propose_args(reference_run, world, out, five))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped_existing"] == n_before  # the rerun completed only what was missing
    assert manifest["counts"]["written"] + n_before == manifest["counts"]["images"]
    _assert_same_folder(ref, out, "*.png")
    _assert_same_folder(ref, out, "instances/*.json")
    assert json.loads((ref / "instances.json").read_text()) == json.loads((out / "instances.json").read_text())


@pytest.mark.parametrize("point", ["write:segnet2.onnx@1", "write:segnet2.onnx.json@1"],
                         ids=["during the ONNX write", "during the metadata write"])
def test_export_killed_then_rerun_equals_uninterrupted(reference_run, tmp_path, point):
    from boxseg.errors import DataError
    from boxseg.predict import load_predictor

    model = reference_run / "stages" / "segnet2_r1" / "final.pt"
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run_cli("export", "--model", model, "--out", ref).returncode == 0
    r = run_cli("export", "--model", model, "--out", out, failpoint=point)
    assert r.returncode == -signal.SIGKILL, f"the failpoint {point} was never reached:\n{r.stderr[-2000:]}"
    assert_no_partial_files(out)
    if (out / "segnet2.onnx").exists():  # the graph landed, its metadata did not: refused, not guessed
        with pytest.raises(DataError, match="metadata"):
            load_predictor(out / "segnet2.onnx", torch.device("cpu"), "fp32")
    else:
        assert not (out / "segnet2.onnx.json").exists()
    r = run_cli("export", "--model", model, "--out", out)
    assert r.returncode == 0, r.stderr
    _assert_same_folder(ref, out, "segnet2.onnx*")


def test_changed_settings_on_resume_are_refused(world, tmp_path):
    """Not a numerical fault but its neighbour: resuming with another config (other than the
    learning rates and workers) would mix two runs; it is refused, naming the field."""
    out = tmp_path / "run"
    assert run_cli("train", *_train_args(world, out), failpoint="step:segnet2_r1@3").returncode == -signal.SIGKILL
    r = run_cli("train", *_train_args(world, out, "--set", "segnet2.iters=7"))
    assert r.returncode == 3 and f"{out / 'config.yaml'}: this run was started with other settings (segnet2.iters)" \
        in r.stderr, r.stderr
