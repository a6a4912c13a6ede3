"""boxseg-bench on CPU: every row has numbers that fit together, or says why it did not run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import boxseg
from boxseg.bench import source_commit
from boxseg.cli.bench import main as bench_cli


def test_bench_writes_consistent_rows(tmp_path):
    r = CliRunner().invoke(bench_cli, ["--model", "segnet2", "--preset", "tiny", "--size", "64",
                                       "--backends", "torch,onnxruntime,tensorrt", "--batch", "1,2",
                                       "--warmup", "1", "--iters", "3", "--out", str(tmp_path), "--tag", "t"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["command"].startswith("boxseg-bench") and row["date"] for row in rows)
    ok = [row for row in rows if row["status"] == "ok"]
    assert {(row["backend"], row["batch"]) for row in ok} >= {("torch", 1), ("torch", 2), ("onnxruntime", 1)}
    for row in ok:
        assert row["median_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert abs(row["images_per_s"] - row["batch"] / (row["median_ms"] / 1000)) < 0.01 * row["images_per_s"] + 0.01
        assert abs(row["tflops"] - row["images_per_s"] * row["gflop_per_image"] / 1000) <= 0.05 * row["tflops"] + 1e-4
        assert row["gflop_per_image"] > 0 and row["matmul_tflops"] > 0
    trt = [row for row in rows if row["backend"] == "tensorrt"]
    assert all(row["status"].startswith("not run:") for row in trt)
    assert (tmp_path / "t.png").stat().st_size > 1000 and "| segnet2@64 |" in (tmp_path / "t.md").read_text()
    assert {row["commit"] for row in rows} == {source_commit()}
    assert f"boxseg at {source_commit() or 'an unknown commit'}, " in (tmp_path / "t.md").read_text()


def _commit_of(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from boxseg.bench import source_commit; print(source_commit())"],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)


def test_rows_name_the_commit_of_the_source_that_ran(tmp_path):
    """`commit`: git's short hash of the checkout boxseg runs from, +dirty when the package's
    tracked files differ from it; None outside a checkout."""
    src = Path(boxseg.__file__).resolve().parent

    def git(*args, cwd=src):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)

    try:
        head = git("rev-parse", "--short", "HEAD")
    except OSError:
        pytest.skip("git is not installed")
    if head.returncode != 0:
        pytest.skip("boxseg does not run from a git checkout here")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".").stdout.strip()
    assert source_commit() == head.stdout.strip() + ("+dirty" if dirty else "")
    # a copy outside any checkout has none
    copy = tmp_path / "copy"
    shutil.copytree(src, copy / "boxseg", ignore=shutil.ignore_patterns("__pycache__"))
    r = _commit_of(copy)
    assert r.stdout.strip() == "None", r.stderr
    # a copy inside a checkout that does not track it (installed into a venv there) has none
    git("init", "-q", cwd=copy)
    (copy / "other.txt").write_text("x")
    git("add", "other.txt", cwd=copy)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "other", cwd=copy)
    assert _commit_of(copy).stdout.strip() == "None"
    # and a checkout whose package differs from its commit is dirty
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", cwd=copy)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c", cwd=copy)
    r = _commit_of(copy)
    short = git("rev-parse", "--short", "HEAD", cwd=copy).stdout.strip()
    assert r.stdout.strip() == short, r.stderr
    with open(copy / "boxseg" / "bench.py", "a") as f:
        f.write("# changed\n")
    r = _commit_of(copy)
    assert r.stdout.strip() == short + "+dirty", r.stderr


def test_e2e_times_the_proposal_pipeline_against_the_model(world, tmp_path):
    from boxseg.bench import bench_e2e, markdown
    from boxseg.config import SegNet2Config
    from boxseg.data.images import ImageSet
    from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
    from boxseg.models.meta import build_model, segnet2_meta

    import torch

    meta = segnet2_meta(SegNet2Config(widths=(16, 16, 24, 24), blocks=1, bottom_blocks=1, stem_channels=8,
                                      input_size=96), 4)
    images = ImageSet(VOCDataset(world.voc_root, "train"), NUM_VOC_CLASSES)
    rows = bench_e2e(build_model(meta).eval(), meta, "segnet2@96", images, ["fp32"], [8], torch.device("cpu"),
                     workers=0, warmup=1, iters=2, log=lambda s: None)
    assert [(r.backend, r.status) for r in rows] == [("model-only torch", "ok"), ("propose-e2e torch", "ok")]
    model_only, e2e = rows
    assert model_only.images_per_s > 0 and e2e.images_per_s > 0 and e2e.median_ms > 0
    n_pairs = len(images.class_pairs())
    assert f"{n_pairs} pairs; 3 timed runs, each against the model alone just before it" in e2e.note
    # every run paired with its own model-only timing; the row is the run with the median ratio
    pairs = [tuple(float(v) for v in p.split(" / "))
             for p in e2e.note.split("(e2e / model-only pairs/s: ")[1].split(")")[0].split(", ")]
    ratios = [a / mo for a, mo in pairs]
    assert len(pairs) == 3 and all(a > 0 and mo > 0 for a, mo in pairs)
    (k,) = [j for j, (a, _) in enumerate(pairs) if a == pytest.approx(e2e.images_per_s, abs=0.06)]
    assert ratios[k] == pytest.approx(sorted(ratios)[1], abs=0.002)  # (the note's figures are rounded)
    shown = float(e2e.note.split("e2e / model-only = ")[1].split("%")[0])
    assert shown == pytest.approx(100 * ratios[k], abs=0.6)
    assert "timed 3 x 2 batches" in model_only.note
    # the stage breakdown: every stage named with its seconds, and the device's busy share
    for stage in ("wait_decode", "upload", "model", "post", "download", "wait_writers", "device busy"):
        assert stage in e2e.note, e2e.note
    assert "e2e / model-only" in markdown(rows)
    five = segnet2_meta(SegNet2Config(widths=(16, 16, 24, 24), blocks=1, bottom_blocks=1, stem_channels=8,
                                      input_size=96), 5)
    (row,) = bench_e2e(build_model(five).eval(), five, "x", images, ["fp32"], [8], torch.device("cpu"), 0, 1, 1)
    assert row.status.startswith("not run: --e2e times a 4-channel")


def test_profile_e2e_script_runs_the_pipeline_under_the_profiler(world, tmp_path):
    """bench/profile_e2e.py (a GPU-check step) on CPU: it broke once when the pipeline asked
    the image set for a method its subset wrapper lacked, which only a GPU run would have shown."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    r = subprocess.run([sys.executable, str(root / "bench" / "profile_e2e.py"), str(world.voc_root), "--device", "cpu",
                        "--preset", "tiny", "--batch", "8", "--workers", "1", "--limit", "12", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / "profile_e2e.txt").read_text()
    assert "Self CPU time total" in text and "aten::" in text
    assert (tmp_path / "profile_e2e.json.gz").stat().st_size > 1000


def test_e2e_of_a_segnet1_times_the_eval_pipeline_against_the_model(world, tmp_path):
    """boxseg-bench --e2e with a SegNet1: boxseg-eval's pipeline (evaluate_segnet1) on the val
    split, each timed run against the model alone just before it, as propose's."""
    r = CliRunner().invoke(bench_cli, ["--model", "segnet1", "--preset", "tiny", "--e2e", "--voc-root",
                                       str(world.voc_root), "--batch", "4", "--iters", "2", "--warmup", "1",
                                       "--device", "cpu", "--workers", "1", "--tag", "ev", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert [(x["backend"], x["status"]) for x in rows] == [("model-only torch", "ok"), ("eval-e2e torch", "ok")]
    model_only, e2e = rows
    n_val = len((world.voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split())
    assert f"images/s over {n_val} images (boxseg-eval's pipeline" in e2e["note"]
    pairs = [tuple(float(v) for v in p.split(" / "))
             for p in e2e["note"].split("(e2e / model-only images/s: ")[1].split(")")[0].split(", ")]
    ratios = sorted(a / mo for a, mo in pairs)
    assert len(pairs) == 3 and all(a > 0 and mo > 0 for a, mo in pairs)
    shown = float(e2e["note"].split("e2e / model-only = ")[1].split("%")[0])
    assert shown == pytest.approx(100 * ratios[1], abs=0.6)
    assert min(abs(e2e["images_per_s"] - a) for a, _ in pairs) < 0.06  # (the note's figures are rounded)
    assert "timed 3 x 2 batches" in model_only["note"] and model_only["images_per_s"] > 0
    assert "e2e / model-only" in (tmp_path / "ev.md").read_text()
    r = CliRunner().invoke(bench_cli, ["--model", "segnet1", "--preset", "tiny", "--e2e", "--voc-root",
                                       str(world.voc_root), "--streams", "1", "--out", str(tmp_path / "no")])
    assert r.exit_code == 2 and "--streams: boxseg-propose's, for --e2e with a SegNet2" in r.output, r.output


def test_eval_e2e_times_a_run_whose_outputs_overflow_and_says_so(world):
    """Random or broken weights at fp16 may give non-finite outputs: evaluate_segnet1 raises
    after the whole pipeline ran, so the time stands and the row says what was not scored."""
    import torch

    from boxseg.bench import bench_eval_e2e
    from boxseg.config import preset
    from boxseg.data.classes import VOC_TARGET_CLASSES
    from boxseg.data.images import ImageSet
    from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
    from boxseg.models.meta import build_model, segnet1_meta

    meta = segnet1_meta(preset("tiny").segnet1, VOC_TARGET_CLASSES)
    torch.manual_seed(0)
    model = build_model(meta).eval()
    head = [c for c in model.modules() if isinstance(c, torch.nn.Conv2d)][-1]
    with torch.no_grad():  # logits ~1e6: infinite in fp16
        head.weight.mul_(1e7)
        head.bias.mul_(1e7)
    images = ImageSet(VOCDataset(world.voc_root, "val"), NUM_VOC_CLASSES)
    rows = bench_eval_e2e(model, meta, "segnet1", images, ["fp16"], [4], torch.device("cpu"), 1, 1, 1,
                          log=lambda s: None, e2e_runs=1)
    assert [(r.backend, r.status) for r in rows] == [("model-only torch", "ok"), ("eval-e2e torch", "ok")]
    assert f"({len(images)} images with non-finite outputs: not scored)" in rows[1].note, rows[1].note
