"""Numerical faults: a learning rate that makes the loss NaN stops the stage, names the
iteration and keeps the last good checkpoint (and a resume with a sane rate then ends where an
uninterrupted run does); fp16 inference that overflows is reported, never written or scored."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from click.testing import CliRunner

from boxseg.cli.eval import main as eval_cli
from boxseg.cli.export import main as export_cli
from boxseg.cli.propose import main as propose_cli
from boxseg.data.classes import VOC_TARGET_CLASSES
from boxseg.models.meta import build_model, segnet1_meta, segnet2_meta
from boxseg.models.checkpoint import load_state_file, save_checkpoint

from .conftest import assert_no_partial_files, assert_same_run, run_cli, train_args
from .test_hostile import S1, S2



def test_nan_learning_rate_stops_keeps_last_good_and_resumes(world, reference_run, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", *train_args(world, out), failpoint="step:segnet2_r1@3")  # last.pt at iteration 2
    assert r.returncode == -signal.SIGKILL
    last = out / "stages" / "segnet2_r1" / "last.pt"
    good = last.read_bytes()
    r = run_cli("train", *train_args(world, out, "--set", "segnet2.lr=1e30"))
    text = r.stdout + r.stderr
    assert r.returncode == 4, text
    assert "[segnet2_r1] loss became nan at iteration 3; stopped" in text and f"Last good checkpoint: {last}" in text
    assert "learning rate changed since the checkpoint: 0.002 -> 1e+30" in text
    assert "Traceback" not in text
    assert last.read_bytes() == good and load_state_file(last)["iteration"] == 2
    assert not (out / "stages" / "segnet2_r1" / "final.pt").exists()
    assert_no_partial_files(out)
    # the user lowers the rate again and resumes: the run ends bitwise where the uninterrupted one does
    r = run_cli("train", *train_args(world, out))
    assert r.returncode == 0, r.stderr
    assert "resuming at iteration 2/5" in r.stdout + r.stderr
    assert_same_run(reference_run, out)


def test_nan_learning_rate_in_a_later_stage_keeps_the_finished_ones(world, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", *train_args(world, out, "--set", "segnet1.lr=1e30"))
    text = r.stdout + r.stderr
    assert r.returncode == 4 and "[segnet1_source] loss became nan at iteration" in text, text
    assert "no checkpoint written yet" in text or "Last good checkpoint: " in text
    assert load_state_file(out / "stages" / "segnet2_r1" / "final.pt")["iteration"] == 5  # kept, whole
    assert not (out / "stages" / "segnet1_source" / "final.pt").exists()
    assert_no_partial_files(out)


def _overflowing(meta: dict, path) -> None:
    """Weights whose logits are ~1e6: finite in fp32, infinite in fp16 (max 65504)."""
    torch.manual_seed(0)
    m = build_model(meta).eval()
    head = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        head.weight.mul_(1e7)
        head.bias.mul_(1e7)
    save_checkpoint(path, {"model": m.state_dict(), "meta": meta})


@pytest.fixture(scope="module")
def overflow(tmp_path_factory):
    d = tmp_path_factory.mktemp("overflow")
    _overflowing(segnet2_meta(S2, 4), d / "segnet2.pt")
    _overflowing(segnet1_meta(S1, VOC_TARGET_CLASSES), d / "segnet1.pt")
    return d


def _propose(world, model, out, precision):
    return CliRunner().invoke(propose_cli, ["--model", str(model), "--voc-root", str(world.voc_root), "--out",
                                            str(out), "--workers", "0", "--device", "cpu", "--precision", precision])


def test_fp16_overflow_in_propose_is_reported_not_written(world, overflow, tmp_path):
    r = _propose(world, overflow / "segnet2.pt", tmp_path / "fp32", "fp32")
    assert r.exit_code == 0, r.output
    n = len(list((tmp_path / "fp32").glob("*.png")))
    assert n == len((world.voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split())
    r = _propose(world, overflow / "segnet2.pt", tmp_path / "fp16", "fp16")
    assert r.exit_code == 5, r.output
    assert not list((tmp_path / "fp16").glob("*.png"))
    manifest = json.loads((tmp_path / "fp16" / "manifest.json").read_text())
    assert manifest["counts"]["failed"] == len(manifest["failed"]) >= n and manifest["counts"]["written"] == 0
    assert all("non-finite network output at fp16" in f["problem"] for f in manifest["failed"])
    assert "non-finite" in r.output


def test_fp16_overflow_in_eval_is_reported_not_scored(world, overflow, tmp_path):
    args = ["--model", str(overflow / "segnet1.pt"), "--voc-root", str(world.voc_root), "--device", "cpu",
            "--out", str(tmp_path / "e")]
    r = CliRunner().invoke(eval_cli, [*args, "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    (tmp_path / "e" / "results.json").unlink()
    r = CliRunner().invoke(eval_cli, [*args, "--precision", "fp16"])
    assert r.exit_code == 5 and "non-finite network output at fp16 for 12 image(s)" in r.output, r.output
    assert "mIoU" not in r.output and not (tmp_path / "e" / "results.json").exists()


def test_fp16_export_of_an_overflowing_model_fails_its_parity_check(overflow, tmp_path):
    r = CliRunner().invoke(export_cli, ["--model", str(overflow / "segnet2.pt"), "--out", str(tmp_path), "--fp16"])
    assert r.exit_code == 7, r.output
    assert "parity vs PyTorch" in r.output and "FAIL" in r.output and "NON-FINITE outputs" in r.output
    assert "should not be trusted" in r.output
