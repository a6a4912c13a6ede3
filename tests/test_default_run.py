"""The README's main job, checked against the claims the README makes of it.

Slow (11 min on 2 CPU cores): `python -m pytest -m slow tests/test_default_run.py`. The
synthetic world is built in the pytest temp folder unless BOXSEG_CACHE points at a cache.
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_default_run_learned_proposals_beat_the_baselines_and_improve_each_round(tmp_path):
    env = {**os.environ, "BOXSEG_CACHE": os.environ.get("BOXSEG_CACHE", str(tmp_path / "cache"))}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "boxseg.cli.train", "--out", str(out)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    base, rounds = res["baselines"], res["rounds"]
    props = [rounds[f"round{k}"]["proposal_miou"] for k in (1, 2, 3)]
    # the learned proposals of every round beat box-filled and GrabCut, and no round loses ground
    for p in props:
        assert p > base["grabcut"]["proposal_miou"] > base["box"]["proposal_miou"]
    # rounds do not lose ground: round 2 sat 0.03 below round 1 in one run and 0.3 above it in another
    # (other machine, other CPU memory format), so a step may dip by 0.1 point; the last beats the first
    assert all(b >= a - 0.001 for a, b in zip(props, props[1:])) and props[-1] > props[0], props
    # the box-supervised SegNet1 against full supervision and the box-filled baseline
    assert res["ratio_learned_full"] >= 0.95
    assert res["gain_over_box_points"] >= 5
