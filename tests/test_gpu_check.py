"""bench/gpu_check.sh, dry: every step's command parsed on CPU (tests/gpu_check_stub.py
stands in for python), so the one call a lent GPU gets does not fail on a renamed option,
command or import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _steps() -> list[str]:
    return re.findall(r"^step (\w+) \d+ ", SCRIPT.read_text(), re.M)


def test_every_step_is_documented_in_the_header():
    header = SCRIPT.read_text().split("\nset -uo pipefail", 1)[0]
    steps = _steps()
    assert len(steps) == len(set(steps)) >= 15
    assert [s for s in steps if not re.search(rf"^#\s+(\w+, )?{s}\b", header, re.M)] == []


def test_every_step_parses(tmp_path):
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "gpu_check_stub.py"}" "$@"\n')
    python.chmod(0o755)
    record = tmp_path / "record.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_ONLY")}
    env.update(PYTHON=str(python), GPU_CHECK_RECORD=str(record), GPU_CHECK_BUDGET="500")
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "dest")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (steps_txt,) = (tmp_path / "dest").glob("gpu_check_*/steps.txt")
    ended = dict(re.findall(r"^(\w+): (rc=\d+|not run)", steps_txt.read_text(), re.M))
    failed = {s: ended.get(s) for s in _steps() if ended.get(s) != "rc=0"}
    logs = {s: (steps_txt.parent / f"{s}.log").read_text()[-600:] for s in failed
            if (steps_txt.parent / f"{s}.log").exists()}
    assert failed == {}, logs
    assert (tmp_path / "dest" / "gpu_check.tgz").stat().st_size > 0
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    benches = [c for c in calls if c[:2] == ["-m", "boxseg.cli.bench"]]
    # e2e x 7 (propose) and 1 (eval), head x 3, tables and tables_compile x 2 each
    assert len(benches) == 15, benches
    assert all("--device" in c and c[c.index("--device") + 1] == "cuda" for c in benches)
