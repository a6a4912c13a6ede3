"""What users of torchvision / timm / mmsegmentation expect of a command line."""

from __future__ import annotations

import pytest
import torch
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


def test_one_default_precision_for_propose_eval_and_the_rounds():
    import torch

    from boxseg.predict import default_precision

    assert default_precision(torch.device("cuda")) == "fp16" and default_precision(torch.device("cpu")) == "fp32"
    for cmd in (propose.main, eval.main):
        opt = next(p for p in cmd.params if p.name == "precision")
        assert opt.default is None and "fp16 on CUDA, fp32 on CPU" in opt.help


def test_the_torch_floor_fixes_the_known_weights_only_bypasses():
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    major, minor = map(int, re.search(r'"torch>=(\d+)\.(\d+)"', text).groups())
    assert (major, minor) >= (2, 10)  # CVE-2025-32434 (fixed in 2.6), CVE-2026-24747 (fixed in 2.10)


def test_every_option_has_help_text():
    """--threshold, --class-margin, --box-centre-fraction and eval's --skip-bad had none."""
    missing = [f"{name} {p.opts[0]}" for name, cmd in COMMANDS.items() for c in [cmd, *getattr(cmd, "commands", {}).values()]
               for p in c.params if p.param_type_name == "option" and not p.help and p.opts[0] not in ("--help",)]
    assert not missing, missing


def test_bf16_with_an_exported_backend_is_a_usage_error(tmp_path):
    for cmd in (propose.main, eval.main):
        r = CliRunner().invoke(cmd, ["--backend", "onnxruntime", "--precision", "bf16", "--device", "cpu",
                                     "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and "runs fp32 or fp16 artifacts, not bf16" in r.output, r.output


def test_cudagraph_without_cuda_is_a_usage_error(tmp_path):
    """It replays CUDA graphs: on the CPU every command says so before reading anything."""
    for cmd in (propose.main, eval.main):
        r = CliRunner().invoke(cmd, ["--backend", "cudagraph", "--device", "cpu",
                                     "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and "cudagraph replays CUDA graphs and needs a CUDA device, not cpu" in r.output, r.output
    from boxseg.predict.torch_backends import CUDAGraphPredictor

    with pytest.raises(ValueError, match="needs a CUDA device"):
        CUDAGraphPredictor(torch.nn.Conv2d(4, 2, 1), {"kind": "segnet2", "input_size": 16}, torch.device("cpu"), "fp32")
