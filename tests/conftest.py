"""Shared fixtures: a small synthetic world built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from boxseg.data.synth import SynthSize, SynthWorld, write_synth
from boxseg.threads import resolve_mkl_vml

resolve_mkl_vml()  # as every command does: before any test's first parallel float maths (threads.py)

SMALL = SynthSize(n_source=40, n_train=24, n_val=12, min_side=64, max_side=96)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> SynthWorld:
    """A read-only synthetic world; copy it (`world_copy`) before changing files."""
    return write_synth(tmp_path_factory.mktemp("world"), seed=3, size=SMALL, workers=1)


@pytest.fixture
def world_copy(world, tmp_path) -> SynthWorld:
    dst = tmp_path / "world"
    shutil.copytree(world.root, dst)
    return SynthWorld(dst, dst / "coco" / "images", dst / "coco" / "annotations" / "instances_train.json",
                      dst / "voc" / "VOC2012", world.box_baseline_miou)


def first_id(voc_root: Path, split: str = "train") -> str:
    return (voc_root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]
