"""boxseg-train under torchrun: 2 CPU processes (gloo) against 1 process.

Tolerance: the two runs see the same samples per step (each rank half of the batch), so the
first steps' losses agree within 5%; they are not bitwise equal because batch norm uses
per-rank statistics and each rank normalises its loss by its own pixel count. The final
val mIoU of the short run agrees within 5 points."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys


def _losses(run) -> list[float]:
    with open(run / "stages" / "segnet1_full" / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_two_process_gloo_matches_one_process(world, tmp_path):
    args = ["-m", "boxseg.cli.train", "--preset", "tiny", "--voc-root", str(world.voc_root),
            "--coco-ann", str(world.coco_ann), "--coco-images", str(world.coco_images), "--setting", "full",
            "--set", "segnet1.iters=30", "--set", "segnet1.batch=8", "--set", "checkpoint_every=10", "--deterministic"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *args, "--out", str(one)], check=True, capture_output=True, env=env)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                        *args, "--out", str(two)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    la, lb = _losses(one), _losses(two)
    assert len(la) == len(lb) == 30
    for a, b in zip(la[:3], lb[:3]):
        assert abs(a - b) <= 0.05 * a, (la[:3], lb[:3])
    ra = json.loads((one / "results.json").read_text())["baselines"]["full"]["val_miou"]
    rb = json.loads((two / "results.json").read_text())["baselines"]["full"]["val_miou"]
    assert abs(ra - rb) <= 0.05
    # rank 0 alone wrote: one final checkpoint, one metrics file, no per-rank leftovers
    assert (two / "stages" / "segnet1_full" / "final.pt").exists()
    assert not (two / "stages" / "segnet1_full" / "last.pt").exists()


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(world, tmp_path):
    """`segnet1.batch` is the global batch: 7 cannot be split over 2 processes (it was
    silently cut to 2 x 3)."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
                        "-m", "boxseg.cli.train", "--preset", "tiny", "--voc-root", str(world.voc_root),
                        "--coco-ann", str(world.coco_ann), "--coco-images", str(world.coco_images), "--setting", "full",
                        "--set", "segnet1.batch=7", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode != 0 and "segnet1.batch=7 is the global batch and does not divide among 2 processes" in r.stderr, \
        r.stderr[-2000:]
    assert not (tmp_path / "run" / "stages").exists()
