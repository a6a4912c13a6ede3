"""What users of torchvision / timm / mmsegmentation expect of a command line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import boxseg
from boxseg.cli import bench, data, eval, export, propose, report, train

COMMANDS = {"boxseg-data": data.main, "boxseg-train": train.main, "boxseg-propose": propose.main,
            "boxseg-eval": eval.main, "boxseg-export": export.main, "boxseg-bench": bench.main,
            "boxseg-report": report.main}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_dash_h_and_version(name):
    r = CliRunner().invoke(COMMANDS[name], ["-h"], prog_name=name)
    assert r.exit_code == 0 and r.output.startswith(f"Usage: {name}"), r.output
    r = CliRunner().invoke(COMMANDS[name], ["--version"], prog_name=name)
    assert r.exit_code == 0 and r.output.strip() == f"{name} (boxseg) {boxseg.__version__}", r.output


def test_dash_h_on_subcommands():
    for sub in ("synth", "check"):
        r = CliRunner().invoke(data.main, [sub, "-h"], prog_name="boxseg-data")
        assert r.exit_code == 0 and r.output.startswith(f"Usage: boxseg-data {sub}"), r.output
