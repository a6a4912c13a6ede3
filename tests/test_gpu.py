"""GPU checks (`-m gpu`; run by bench/gpu_check.sh): fp16 against fp32 through every backend
that runs on the machine, and boxseg-propose on CUDA against CPU fp32. The networks are the
tiny preset's, trained on the default synthetic world (tests/fixtures, made by
tests/fixtures/make.sh): random networks put too many pixels at a near-tie for a label test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from boxseg.cli.propose import main as propose_cli
from boxseg.export.artifacts import open_predictor
from boxseg.predict import load_predictor

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = {"segnet1": FIXTURES / "tiny_segnet1.pt", "segnet2": FIXTURES / "tiny_segnet2.pt"}
CUDA = torch.device("cuda")


def _backends() -> list[str]:
    out = ["torch", "cudagraph", "compile", "aoti"]
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            out.append("onnxruntime")
    if importlib.util.find_spec("tensorrt") is not None:
        out.append("tensorrt")
    return out


def _inputs(world, kind: str, meta: dict) -> torch.Tensor:
    from test_export import _real_inputs

    return _real_inputs(world, meta, 8).to(CUDA)


@pytest.mark.parametrize("kind", ["segnet1", "segnet2"])
@pytest.mark.parametrize("backend", _backends())
def test_fp16_labels_match_fp32(world, tmp_path, monkeypatch, kind, backend):
    monkeypatch.setenv("BOXSEG_CACHE", str(tmp_path / "cache"))
    ref = load_predictor(MODELS[kind], CUDA, "fp32")
    x = _inputs(world, kind, ref.meta)
    want = ref(x).argmax(1)
    got = open_predictor(MODELS[kind], CUDA, "fp16", backend, kind, batch=8)(x)
    assert torch.isfinite(got).all()
    agree = float((got.argmax(1) == want).float().mean())
    assert agree >= 0.999, f"{kind} {backend} fp16: {100 * agree:.3f}% of labels as fp32"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_propose_on_cuda_matches_cpu_fp32(world, tmp_path, precision):
    base = ["--model", str(MODELS["segnet2"]), "--voc-root", str(world.voc_root), "--workers", "2", "--batch", "16"]
    r = CliRunner().invoke(propose_cli, [*base, "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / "cpu")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(propose_cli, [*base, "--device", "cuda", "--precision", precision, "--out", str(tmp_path / "gpu")])
    assert r.exit_code == 0, r.output
    _assert_nearly_identical(tmp_path / "cpu", tmp_path / "gpu", precision)


def _assert_nearly_identical(a_dir: Path, b_dir: Path, precision: str) -> None:
    """The label PNGs of two folders: >= 99.99% identical pixels in fp32, 99.9% in fp16."""
    from PIL import Image

    same = total = 0
    for p in sorted(a_dir.glob("*.png")):
        a = np.asarray(Image.open(p))
        b = np.asarray(Image.open(b_dir / p.name))
        same += int((a == b).sum())
        total += a.size
    need = 0.9999 if precision == "fp32" else 0.999
    assert total and same / total >= need, f"{precision}: {100 * same / total:.4f}% identical pixels"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_eval_on_cuda_matches_cpu_fp32(world, tmp_path, precision):
    """boxseg-eval's pipeline on CUDA (confusion counts by scatter_add_ on the device, the
    labels downloaded a batch at a time into pinned memory) against CPU fp32: the saved
    labels nearly all identical, the same pixels counted, the mIoU within a hair."""
    import json

    from boxseg.cli.eval import main as eval_cli

    base = ["--model", str(MODELS["segnet1"]), "--voc-root", str(world.voc_root), "--batch", "5"]
    runs = {}
    for name, device, prec in (("cpu", "cpu", "fp32"), ("gpu", "cuda", precision)):
        r = CliRunner().invoke(eval_cli, [*base, "--device", device, "--precision", prec, "--out",
                                          str(tmp_path / name), "--save-predictions", str(tmp_path / f"{name}_labels")])
        assert r.exit_code == 0, r.output
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    _assert_nearly_identical(tmp_path / "cpu_labels", tmp_path / "gpu_labels", precision)
    assert runs["gpu"]["pixels"] == runs["cpu"]["pixels"]
    assert abs(runs["gpu"]["miou"] - runs["cpu"]["miou"]) < 0.005, (runs["gpu"]["miou"], runs["cpu"]["miou"])


@pytest.mark.parametrize("kind", ["segnet1", "segnet2"])
def test_cudagraph_replays_the_eager_network_bit_for_bit(world, kind):
    """Captured once, replayed: the same kernels as eager at the same batch shape, so the
    same logits, call after call; a short batch is padded to the captured shape, so it gets
    the rows eager computes in a full batch."""
    eager = load_predictor(MODELS[kind], CUDA, "fp16", batch=8)
    graphed = load_predictor(MODELS[kind], CUDA, "fp16", "cudagraph", batch=8)
    x = _inputs(world, kind, eager.meta)
    want = eager(x)
    for _ in range(2):
        assert torch.equal(graphed(x), want)
        assert torch.equal(graphed(x[:3]), want[:3])
    assert len(graphed.graphs) == 1  # one captured shape


def test_propose_cudagraph_writes_the_eager_labels(world, tmp_path):
    """The same labels as eager; the last, short batch runs padded (eager runs it at its own
    size, where cuDNN may choose other kernels), hence pixels, not bytes."""
    from PIL import Image

    base = ["--model", str(MODELS["segnet2"]), "--voc-root", str(world.voc_root), "--workers", "2", "--batch", "16",
            "--device", "cuda", "--precision", "fp16"]
    for backend in ("torch", "cudagraph"):
        r = CliRunner().invoke(propose_cli, [*base, "--backend", backend, "--out", str(tmp_path / backend)])
        assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "torch").glob("*.png"))
    assert names and names == sorted(p.name for p in (tmp_path / "cudagraph").glob("*.png"))
    same = total = 0
    for n in names:
        a = np.asarray(Image.open(tmp_path / "torch" / n))
        b = np.asarray(Image.open(tmp_path / "cudagraph" / n))
        same += int((a == b).sum())
        total += a.size
    assert same / total >= 0.9999, f"{100 * same / total:.4f}% identical pixels"


def test_propose_on_cuda_decode_threads_write_the_bytes_of_decode_processes(world, tmp_path):
    """On CUDA the decoders are DataLoader processes (pinned chunks); as threads (pinned in
    the thread), or as processes from a forkserver (the writers too), the same chunks reach
    the same kernels: the same bytes."""
    from boxseg.config import ProposalConfig
    from boxseg.data.images import ImageSet
    from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
    from boxseg.propose import propose

    pred = load_predictor(MODELS["segnet2"], CUDA, "fp16", batch=16)
    images = ImageSet(VOCDataset(world.voc_root, "train"), NUM_VOC_CLASSES)
    outs = {}
    for procs, start, kind in ((True, "fork", "processes"), (False, "fork", "threads"),
                               (True, "forkserver", "processes (forkserver)")):
        run = propose(pred, None, images, tmp_path / kind, pred.input_size, ProposalConfig(batch=16), CUDA,
                      "fp16", 2, decode_processes=procs, decode_start=start, writer_start=start)
        assert run.written == len(images) and run.decoders == kind
        assert run.writers == ("processes (forkserver)" if start == "forkserver" else "processes")
        outs[kind] = {p.name: p.read_bytes() for p in sorted((tmp_path / kind).glob("*.png"))}
    assert outs["processes"] and all(o == outs["processes"] for o in outs.values())


def test_propose_with_nvjpeg_labels_match_the_cpu_decoders(world, tmp_path):
    """--decode-on-device: JPEGs decoded by nvJPEG (torchvision) and letterboxed on the GPU.
    The canvases are within JPEG-decoder tolerance of the CPU path's (the statistics are
    printed for the README), and the labels nearly all the same."""
    pytest.importorskip("torchvision", reason="torchvision is not installed (needed by --decode-on-device)")
    from PIL import Image

    from boxseg.config import ProposalConfig
    from boxseg.data.images import ImageSet
    from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
    from boxseg.propose import ProposalRun, _Decoded, _device_canvases, propose

    images = ImageSet(VOCDataset(world.voc_root, "train"), NUM_VOC_CLASSES)
    host, dev = _Decoded(images, list(range(len(images))), 128), _Decoded(images, list(range(len(images))), 128,
                                                                          device_jpeg=True)
    run, diffs = ProposalRun(), []
    for k in range(len(images)):
        a, b = host[k], dev[k]
        assert "jpeg" in b
        c = _device_canvases([b], None, CUDA, run)[0].cpu()
        diffs.append((c.int() - torch.from_numpy(a["canvas"]).int()).abs())
    d = torch.cat([x.flatten() for x in diffs]).float()
    print(f"nvJPEG canvases against the CPU path: max |diff| {int(d.max())}, mean {d.mean():.3f}, "
          f"values differing {100 * (d > 0).float().mean():.1f}%, by more than 2: {100 * (d > 2).float().mean():.2f}%")
    assert run.jpeg_fallbacks == 0 and d.mean() < 2
    pred = load_predictor(MODELS["segnet2"], CUDA, "fp16", batch=16)
    runs = {}
    for on_device in (False, True):
        runs[on_device] = propose(pred, None, images, tmp_path / str(on_device), pred.input_size,
                                  ProposalConfig(batch=16), CUDA, "fp16", 2, device_jpeg=on_device)
        assert runs[on_device].written == len(images)
    assert runs[True].jpeg_decoder == "nvJPEG" and runs[True].jpeg_fallbacks == 0
    same = total = 0
    for p in sorted((tmp_path / "False").glob("*.png")):
        a, b = np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "True" / p.name))
        same += int((a == b).sum())
        total += a.size
    print(f"labels identical: {100 * same / total:.3f}% of pixels")
    assert same / total >= 0.99
