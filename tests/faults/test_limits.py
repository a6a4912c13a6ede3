"""Arguments out of range, resources and leftovers (issue 17): each is a usage error (exit 2)
or an error naming the file (exit 3), a full disk is exit 10, and a killed run leaves no
worker processes behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from boxseg.cli.eval import main as eval_cli
from boxseg.cli.export import main as export_cli
from boxseg.cli.propose import main as propose_cli
from boxseg.cli.train import main as train_cli

from test_propose import S2, _save


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from boxseg.models.meta import segnet2_meta

    return _save(tmp_path_factory.mktemp("lim") / "s2.pt", segnet2_meta(S2, 4))


def _train_args(world, out, *extra):
    return ["--voc-root", str(world.voc_root), "--coco-ann", str(world.coco_ann), "--coco-images",
            str(world.coco_images), "--out", str(out), "--set", "baselines=[]", *extra]


# -- meaningless values, accepted silently before ------------------------------------------------
@pytest.mark.parametrize("extra, problem", [
    (["--rounds", "-1"], "-1 is not in the range x>=0"),
    (["--set", "setting=bogus"], "setting must be weak, semi or full"),
    (["--set", "amp=fp8"], "amp must be none or bf16"),
    (["--set", "data.synth_size=huge"], "data.synth_size must be one of"),
    (["--set", "segnet1.batch=0"], "segnet1.batch must be >= 1"),
    (["--set", "proposals.threshold=5"], "proposals.threshold must be in (0, 1)"),
    (["--workers", "-1"], "-1 is not in the range x>=0"),
    (["--device", "banana"], "unknown device 'banana'"),
    (["--device", "cuda:7"], "CUDA is not available here"),
])
def test_train_refuses_before_writing_anything(world, tmp_path, extra, problem):
    out = tmp_path / "run"
    r = CliRunner().invoke(train_cli, _train_args(world, out, *extra))
    assert r.exit_code == 2 and problem in r.output, r.output
    assert not (out / "config.yaml").exists()


def test_a_refused_config_leaves_the_folder_usable_and_overwrite_restarts_it(world, tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(train_cli, _train_args(world, out, "--set", "segnet1.batch=0")).exit_code == 2
    fast = ["--rounds", "0", "--set", "segnet1.iters=2", "--set", "segnet1.batch=4", "--set", "baselines=[full]"]
    r = CliRunner().invoke(train_cli, _train_args(world, out, *fast))
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(train_cli, _train_args(world, out, *fast, "--set", "segnet1.iters=3"))
    assert r.exit_code == 3 and "other settings (segnet1.iters)" in r.output  # resuming with other settings
    r = CliRunner().invoke(train_cli, _train_args(world, out, *fast, "--set", "segnet1.iters=3", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert (out / "stages" / "segnet1_full" / "metrics.csv").read_text().splitlines()[-1].startswith("3,")


@pytest.mark.parametrize("extra, problem", [
    (["--threshold", "5"], "threshold must be in (0, 1)"),
    (["--threshold", "nan"], "threshold must be in (0, 1)"),
    (["--margin", "-1"], "margin must be in [0, 1)"),
    (["--box-centre-fraction", "-1"], "must be in (0, 1]"),
    (["--workers", "-1"], "-1 is not in the range x>=0"),
    (["--device", "banana"], "unknown device"),
])
def test_propose_refuses_meaningless_settings(world, tmp_path, ckpt, extra, problem):
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpt), "--voc-root", str(world.voc_root),
                                         "--out", str(tmp_path / "o"), *extra])
    assert r.exit_code == 2 and problem in r.output, r.output
    assert not list((tmp_path / "o").glob("*.png"))


@pytest.mark.parametrize("scales", ["0", "-1", "100"])
def test_eval_refuses_absurd_scales(world, tmp_path, ckpt, scales):
    """--scales=100 grew the process to 23 GB before the kernel killed it."""
    r = CliRunner().invoke(eval_cli, ["--proposals", str(tmp_path), "--voc-root", str(world.voc_root),
                                      "--scales", scales])
    assert r.exit_code == 2 and "scales must lie in [0.1, 4]" in r.output, r.output


@pytest.mark.parametrize("cli", ["propose", "eval"])
def test_an_empty_split_is_an_error_not_a_score_of_zero(world_copy, tmp_path, ckpt, cli):
    (world_copy.voc_root / "ImageSets" / "Segmentation" / "empty.txt").write_text("\n")
    if cli == "propose":
        args, cmd = ["--model", str(ckpt), "--out", str(tmp_path / "o")], propose_cli
    else:
        args, cmd = ["--proposals", str(tmp_path)], eval_cli
    r = CliRunner().invoke(cmd, [*args, "--voc-root", str(world_copy.voc_root), "--split", "empty"])
    assert r.exit_code == 3 and "empty.txt: the split lists no usable image" in r.output, r.output


# -- output folders --------------------------------------------------------------------------------
@pytest.mark.parametrize("cli", ["propose", "train", "export"])
def test_out_naming_a_file(world, tmp_path, ckpt, cli):
    f = tmp_path / "file"
    f.write_text("x")
    args = {"propose": (propose_cli, ["--model", str(ckpt), "--voc-root", str(world.voc_root), "--out", str(f)]),
            "train": (train_cli, _train_args(world, f)),
            "export": (export_cli, ["--model", str(ckpt), "--out", str(f)])}[cli]
    r = CliRunner().invoke(*args)
    assert r.exit_code == 3 and f"{f}: --out names a file, not a folder" in r.output, r.output


def test_out_not_writable(world, tmp_path, ckpt, monkeypatch):
    """As root every folder is writable, so the check (os.access) is given a read-only answer."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) and mode & os.W_OK else real(p, mode))
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpt), "--voc-root", str(world.voc_root), "--out", str(ro)])
    assert r.exit_code == 3 and f"{ro}: the output folder is not writable" in r.output, r.output


# -- a full disk -------------------------------------------------------------------------------------
def test_disk_full_while_proposing(world, tmp_path, ckpt, monkeypatch):
    import boxseg.data.files as files

    real = files.os.replace
    writes = {"n": 0}

    def replace(src, dst):
        writes["n"] += 1
        if writes["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(files.os, "replace", replace)
    out = tmp_path / "o"
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpt), "--voc-root", str(world.voc_root), "--workers", "0",
                                         "--out", str(out)])
    assert r.exit_code == 10 and "no space left on device while writing" in r.output, r.output
    assert "Traceback" not in r.output
    monkeypatch.setattr(files.os, "replace", real)
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpt), "--voc-root", str(world.voc_root), "--workers", "0",
                                         "--out", str(out)])
    assert r.exit_code == 0 and "already there" in r.output, r.output  # resumes


def test_disk_full_while_training(world, tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... unexpected pos'); it is said plainly."""
    import boxseg.data.files as files
    import boxseg.models.checkpoint as ck

    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(ck.torch, "save", full)
    monkeypatch.setattr(files, "_disk_full", lambda folder: True)
    r = CliRunner().invoke(train_cli, _train_args(world, tmp_path / "run", "--rounds", "0", "--set", "segnet1.iters=2",
                                                  "--set", "segnet1.batch=4", "--set", "baselines=[full]"))
    assert r.exit_code == 10 and "no space left on device while writing" in r.output and "final.pt" in r.output, \
        r.output


# -- signals and leftovers -----------------------------------------------------------------------------
def test_sigterm_ends_a_command_as_ctrl_c_does():
    from boxseg.cli import stop_on_sigterm

    old = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, old)


def test_killed_propose_leaves_no_workers(world, tmp_path, ckpt):
    """Its DataLoader workers (~180 MB each) outlived a SIGKILL for over 80 s."""
    out = tmp_path / "marker-out"
    env = {**os.environ, "BOXSEG_FAILPOINT": "propose.batch@2"}
    r = subprocess.run([sys.executable, "-m", "boxseg.cli.propose", "--model", str(ckpt), "--voc-root",
                        str(world.voc_root), "--workers", "2", "--batch", "4", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]

    def survivors() -> list[int]:
        pids = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:
                    continue
                if str(out).encode() in cmd:
                    pids.append(int(pid))
        return pids
    deadline = time.time() + 3
    while survivors() and time.time() < deadline:
        time.sleep(0.1)
    assert survivors() == []
