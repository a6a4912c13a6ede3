"""Fault-injection suite: helpers, and a tally of the cases tried per kind.

Every test module here is one kind of fault (kills, bad data, hostile files, numerical
faults, concurrency); each parametrised case counts once. The tally is printed at the end of
a run that collected this folder, and written to $BOXSEG_FAULT_TALLY (JSON) when that is set.
"""

from __future__ import annotations

import csv
import filecmp
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml
import pytest
import torch
from PIL import Image

from boxseg.faults import ENV as FAILPOINT_ENV

KINDS = {"test_kills": "kills", "test_bad_data": "bad data", "test_hostile": "hostile files",
         "test_numeric": "numerical faults", "test_concurrency": "concurrency", "test_silent": "silent wrong results",
         "test_malformed": "malformed input", "test_limits": "limits and leftovers"}
_tally: dict[str, dict[str, int]] = defaultdict(lambda: {"tried": 0, "handled": 0})


def _kind(nodeid: str) -> str | None:
    if "tests/faults/" not in nodeid.replace("\\", "/"):
        return None
    module = Path(nodeid.split("::")[0]).stem
    return KINDS.get(module)


def pytest_runtest_logreport(report):
    kind = _kind(report.nodeid)
    if kind is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.skipped:
            return
        _tally[kind]["tried"] += 1
        _tally[kind]["handled"] += int(report.passed)


def pytest_terminal_summary(terminalreporter):
    if not _tally:
        return
    tw = terminalreporter
    tw.section("fault-injection cases")
    for kind in KINDS.values():
        if kind in _tally:
            t = _tally[kind]
            tw.line(f"{kind:18s} tried {t['tried']:3d}  handled {t['handled']:3d}")
    total = {k: sum(t[k] for t in _tally.values()) for k in ("tried", "handled")}
    tw.line(f"{'all':18s} tried {total['tried']:3d}  handled {total['handled']:3d}")
    if os.environ.get("BOXSEG_FAULT_TALLY"):
        Path(os.environ["BOXSEG_FAULT_TALLY"]).write_text(json.dumps({**_tally, "all": total}, indent=2))


def run_cli(module: str, *args, failpoint: str | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m boxseg.cli.<module> ARGS` in a subprocess, optionally with a failpoint armed."""
    env = {k: v for k, v in os.environ.items() if k != FAILPOINT_ENV}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    if failpoint:
        env[FAILPOINT_ENV] = failpoint
    return subprocess.run([sys.executable, "-m", f"boxseg.cli.{module}", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def assert_no_partial_files(root: Path) -> list[Path]:
    """Every file under its final (visible) name parses completely; returns the hidden
    temporaries a kill left behind (names starting with '.', ending in '.tmp')."""
    from boxseg.models.checkpoint import load_state_file

    leftovers = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or "tb" in p.relative_to(root).parts:
            continue
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            leftovers.append(p)
            continue
        if p.suffix == ".pt":
            assert "model" in load_state_file(p), p
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            rows = list(csv.DictReader(open(p)))
            assert all(None not in r.values() for r in rows), p
        elif p.suffix == ".yaml":
            yaml.safe_load(p.read_text())
        elif p.suffix == ".onnx":
            import onnx

            onnx.checker.check_model(str(p))
    return leftovers


# boxseg-train on the session's small world: 2 rounds, a few iterations per stage, checkpoints
# every 2 iterations, deterministic, and on one intra-op thread. With two threads, about one
# training process in 30 inside this suite trained its first stage differently from the same
# command run before (loss at iteration 3: 0.756599 and 0.756718 instead of 0.756617; the
# first two iterations equal); never in 224 runs of the same command outside the suite, nor
# in 500 repeats of that stage in one process. The cause was not found; one thread leaves
# no reduction split or thread timing to chance.
FAST = ["--preset", "tiny", "--rounds", "2", "--deterministic", "--threads", "1", "--set", "baselines=[]",
        "--set", "segnet1.iters=5", "--set", "segnet2.iters=5", "--set", "segnet2.iters_next=4",
        "--set", "checkpoint_every=2", "--set", "segnet1.batch=4", "--set", "segnet2.batch=4"]


def train_args(world, out: Path, *extra) -> list:
    return ["--voc-root", world.voc_root, "--coco-ann", world.coco_ann, "--coco-images", world.coco_images,
            "--out", out, *FAST, *extra]


@pytest.fixture(scope="session")
def reference_run(world, tmp_path_factory) -> Path:
    """An uninterrupted run to compare killed-and-resumed runs with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run_cli("train", *train_args(world, out))
    assert r.returncode == 0, r.stderr
    return out


def assert_same_run(ref: Path, out: Path) -> None:
    """Same stages with bitwise-equal weights, byte-identical proposal PNGs, equal round results."""
    from boxseg.models.checkpoint import load_state_file as _load

    stages = sorted(p.parent.name for p in (ref / "stages").glob("*/final.pt"))
    assert stages == sorted(p.parent.name for p in (out / "stages").glob("*/final.pt"))
    assert len(stages) == 5  # segnet2_r1, segnet1_source, segnet1_r1, segnet2_r2, segnet1_r2
    for s in stages:
        a = _load(ref / "stages" / s / "final.pt")["model"]
        b = _load(out / "stages" / s / "final.pt")["model"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{s}: weights differ from the uninterrupted run"
        assert not (out / "stages" / s / "last.pt").exists()
    for d in sorted(p for p in (ref / "proposals").iterdir() if p.is_dir()):
        names = sorted(p.name for p in d.glob("*.png"))
        assert names and names == sorted(p.name for p in (out / "proposals" / d.name).glob("*.png"))
        match, mismatch, errors = filecmp.cmpfiles(d, out / "proposals" / d.name, names, shallow=False)
        assert not mismatch and not errors, (d.name, mismatch, errors)
    a, b = (json.loads((p / "results.json").read_text()) for p in (ref, out))
    assert a["rounds"] == b["rounds"]
