"""Hostile files through the real commands: a checkpoint whose pickle would run code, ONNX
external data that leaves its folder or goes through a symlink, artifacts whose metadata
names another model kind, class count or input size. Each is refused with an error naming
the file, before any inference (no label PNG is written), and the code never runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from boxseg.cli.eval import main as eval_cli
from boxseg.cli.export import main as export_cli
from boxseg.cli.propose import main as propose_cli
from boxseg.config import SegNet1Config, SegNet2Config
from boxseg.data.classes import SOURCE_CLASSES, VOC_TARGET_CLASSES
from boxseg.export.onnx import export_onnx
from boxseg.models.meta import build_model, segnet1_meta, segnet2_meta
from boxseg.models.checkpoint import save_checkpoint

from .conftest import run_cli, train_args as _train_args

S2 = SegNet2Config(widths=(16, 16, 24, 24), blocks=1, bottom_blocks=1, stem_channels=8, input_size=96)
S1 = SegNet1Config(width=0.125, batch_norm=True, dropout=0.0, convs_per_block=(1, 1, 1, 1, 1), fc6_dilation=2,
                   test_size=97)


class RunsCode:
    """Unpickling this calls os.system: the payload touches a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _ckpt(path: Path, meta: dict, **extra) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, {"model": build_model(meta).eval().state_dict(), "meta": meta, **extra})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    marker = d / "PWNED"
    f = {"marker": marker,
         "segnet2": _ckpt(d / "segnet2.pt", segnet2_meta(S2, 4)),
         "segnet2_5ch": _ckpt(d / "segnet2_5ch.pt", segnet2_meta(S2, 5)),
         "segnet1": _ckpt(d / "segnet1.pt", segnet1_meta(S1, VOC_TARGET_CLASSES)),
         "segnet1_source": _ckpt(d / "segnet1_source.pt", segnet1_meta(S1, SOURCE_CLASSES))}
    torch.save({"model": RunsCode(marker)}, d / "evil_top.pt")
    f["evil_top"] = d / "evil_top.pt"
    good = torch.load(f["segnet2"], weights_only=True)
    torch.save({**good, "meta": {**good["meta"], "note": RunsCode(marker)}}, d / "evil_nested.pt")
    f["evil_nested"] = d / "evil_nested.pt"
    (d / "garbage.pt").write_bytes(os.urandom(4096))
    f["garbage"] = d / "garbage.pt"
    (d / "truncated.pt").write_bytes(f["segnet2"].read_bytes()[:20000])
    f["truncated"] = d / "truncated.pt"
    # ONNX artifacts: a good one, and the hostile variants of it
    meta = segnet2_meta(S2, 4)
    onnx_dir = d / "onnx"
    onnx_dir.mkdir()
    torch.manual_seed(0)
    export_onnx(build_model(meta).eval(), meta, onnx_dir / "segnet2.onnx")
    f["onnx"] = onnx_dir / "segnet2.onnx"
    side = json.loads((onnx_dir / "segnet2.onnx.json").read_text())
    for name, change in (("size", {"input_size": 128}), ("kind", {"kind": "segnet1", "in_channels": 3}),
                         ("channels", {"in_channels": 5})):
        shutil.copy(f["onnx"], onnx_dir / f"{name}.onnx")
        (onnx_dir / f"{name}.onnx.json").write_text(json.dumps({**side, **change}))
        f[f"onnx_{name}"] = onnx_dir / f"{name}.onnx"
    for name in ("outside", "symlinked"):
        sub = d / name
        sub.mkdir()
        m = onnx.load(str(f["onnx"]))
        onnx.save_model(m, str(sub / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
        (sub / "m.onnx.json").write_text(json.dumps(side))
        if name == "outside":
            (sub / "weights.bin").rename(d / "secret.bin")
            mm = onnx.load(str(sub / "m.onnx"), load_external_data=False)
            for t in mm.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = "../secret.bin"
            onnx.save_model(mm, str(sub / "m.onnx"))
        else:
            (sub / "weights.bin").rename(d / "real.bin")
            (sub / "weights.bin").symlink_to(d / "real.bin")
        f[f"onnx_{name}"] = sub / "m.onnx"
    (onnx_dir / "link.onnx").symlink_to(f["onnx"])
    shutil.copy(onnx_dir / "segnet2.onnx.json", onnx_dir / "link.onnx.json")
    f["onnx_link"] = onnx_dir / "link.onnx"
    return f


def _propose(world, out, *args):
    return CliRunner().invoke(propose_cli, ["--voc-root", str(world.voc_root), "--out", str(out), "--workers", "0",
                                           "--device", "cpu", *map(str, args)])


def _eval(world, out, *args):
    return CliRunner().invoke(eval_cli, ["--voc-root", str(world.voc_root), "--out", str(out), "--device", "cpu",
                                        *map(str, args)])


def _export(out, *args):
    return CliRunner().invoke(export_cli, ["--out", str(out), *map(str, args)])


# name -> (command, arguments built from `files`, the file that must be named, the problem)
CASES = {
    "pickle that runs code -> propose --model": ("propose", lambda f: ["--model", f["evil_top"]], "evil_top", "refused"),
    "pickle that runs code, nested in meta -> propose --model":
        ("propose", lambda f: ["--model", f["evil_nested"]], "evil_nested", "refused"),
    "pickle that runs code -> propose --segnet1":
        ("propose", lambda f: ["--model", f["segnet2_5ch"], "--segnet1", f["evil_top"]], "evil_top", "refused"),
    "pickle that runs code -> eval --model": ("eval", lambda f: ["--model", f["evil_top"]], "evil_top", "refused"),
    "pickle that runs code -> export --model": ("export", lambda f: ["--model", f["evil_nested"]], "evil_nested",
                                                "refused"),
    "random bytes as a checkpoint": ("propose", lambda f: ["--model", f["garbage"]], "garbage", "cannot read checkpoint"),
    "truncated checkpoint": ("eval", lambda f: ["--model", f["truncated"]], "truncated", "cannot read checkpoint"),
    "ONNX external data outside its folder": ("propose", lambda f: ["--model", f["onnx_outside"]], "onnx_outside",
                                              "outside"),
    "ONNX external data through a symlink": ("propose", lambda f: ["--model", f["onnx_symlinked"]], "onnx_symlinked",
                                             "symbolic link"),
    "ONNX model file that is a symlink": ("propose", lambda f: ["--model", f["onnx_link"]], "onnx_link",
                                          "symbolic link"),
    "ONNX metadata naming another input size": ("propose", lambda f: ["--model", f["onnx_size"]], "onnx_size",
                                                "input"),
    "ONNX metadata naming another model kind": ("propose", lambda f: ["--model", f["onnx_kind"]], "onnx_kind",
                                                "segnet1 model, but a segnet2 is expected"),
    "ONNX metadata naming another channel count": ("propose", lambda f: ["--model", f["onnx_channels"], "--segnet1",
                                                                         f["segnet1"]], "onnx_channels", "channel"),
    "SegNet2 checkpoint given as SegNet1 (eval)": ("eval", lambda f: ["--model", f["segnet2"]], "segnet2",
                                                   "segnet2 model, but a segnet1 is expected"),
    "SegNet1 checkpoint given as SegNet2 (propose)": ("propose", lambda f: ["--model", f["segnet1"]], "segnet1",
                                                      "segnet1 model, but a segnet2 is expected"),
    "SegNet1 with another class count (eval)": ("eval", lambda f: ["--model", f["segnet1_source"]], "segnet1_source",
                                                "classes"),
    "SegNet1 with another class count (propose --segnet1)":
        ("propose", lambda f: ["--model", f["segnet2_5ch"], "--segnet1", f["segnet1_source"]], "segnet1_source",
         "classes"),
}


@pytest.mark.parametrize("case", CASES.keys())
def test_hostile_file_is_refused_before_inference(world, files, tmp_path, case):
    command, args, culprit, problem = CASES[case]
    out = tmp_path / "out"
    r = {"propose": lambda: _propose(world, out, *args(files)), "eval": lambda: _eval(world, out, *args(files)),
         "export": lambda: _export(out, *args(files))}[command]()
    assert r.exit_code == 3, r.output
    assert f"{files[culprit]}" in r.output and problem in r.output, r.output
    assert not files["marker"].exists(), "the pickle's payload ran"
    assert not list(out.glob("*.png")) and not list(out.glob("*.onnx"))


def test_training_refuses_a_hostile_resume_checkpoint(world, files, tmp_path):
    """A run's last.pt swapped for a pickle that runs code: --resume refuses it, names it and
    does not fall back to weights_only=False (the payload never runs)."""
    out = tmp_path / "run"
    r = run_cli("train", *_train_args(world, out), failpoint="step:segnet2_r1@3")
    assert r.returncode == -signal.SIGKILL
    last = out / "stages" / "segnet2_r1" / "last.pt"
    shutil.copy(files["evil_top"], last)
    r = run_cli("train", *_train_args(world, out))
    assert r.returncode != 0 and f"{last}: refused" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert not files["marker"].exists()
