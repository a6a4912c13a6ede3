"""Export layer: ONNX checker and parity for SegNet1 and SegNet2 (4 and 5 channels), fp32 and
fp16; the same mIoU from the torch and onnxruntime predictors; AOTInductor on CPU; TensorRT
where it imports; hostile artifacts refused."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from boxseg.cli.eval import main as eval_cli
from boxseg.cli.export import main as export_cli
from boxseg.data.classes import VOC_TARGET_CLASSES
from boxseg.data.images import ImageSet
from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
from boxseg.errors import DataError
from boxseg.export.common import parity
from boxseg.export.onnx import export_onnx
from boxseg.models.meta import segnet1_meta, segnet2_meta
from boxseg.predict import load_predictor

from test_propose import S1, S2, _model, _save

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _real_inputs(world, meta, n=4) -> torch.Tensor:
    """Synthetic val images letterboxed like the pipelines do (plus a box channel for SegNet2)."""
    from boxseg.data.transforms import MEAN_U8
    from boxseg.predict.image import letterbox, letterbox_params, normalize

    ds = VOCDataset(world.voc_root, "val")
    s = meta["input_size"]
    ims = []
    for i in range(n):
        im = ds[i].image
        ims.append(letterbox(im, letterbox_params(*im.shape[:2], s), MEAN_U8))
    x = normalize(torch.from_numpy(np.stack(ims)))
    if meta["kind"] == "segnet2":
        box = torch.zeros(n, 1, s, s)
        box[:, :, s // 4: 3 * s // 4, s // 4: 3 * s // 4] = 1
        extra = [torch.rand(n, 1, s, s, generator=torch.Generator().manual_seed(0))] if meta["in_channels"] == 5 else []
        x = torch.cat([x, box, *extra], 1)
    return x


CASES = {"segnet1": lambda: segnet1_meta(S1, VOC_TARGET_CLASSES), "segnet2_4": lambda: segnet2_meta(S2, 4),
         "segnet2_5": lambda: segnet2_meta(S2, 5)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fp16", [False, True])
def test_onnx_export_checker_and_parity(world, tmp_path, case, fp16):
    meta = CASES[case]()
    model = _model(meta, 0)
    path = tmp_path / f"{case}.onnx"
    art = export_onnx(model, meta, path, fp16=fp16)
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert m.opset_import[0].version >= 18
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    assert art["parity"]["passed"], art["parity"]
    assert json.loads((tmp_path / f"{case}.onnx.json").read_text())["parity"] == art["parity"]
    # again on synthetic images, at another batch size than the export's
    pred = load_predictor(path, "cpu", expect_kind=meta["kind"])
    x = _real_inputs(world, meta, 5)
    with torch.no_grad():
        ref = model(x)
    p = parity(ref, pred(x), meta["kind"])
    if fp16:
        assert p["label_agreement"] >= 0.995 and p.get("mask_iou", 1.0) >= 0.99, p
    else:
        assert p["rel_diff"] <= 1e-4, p


def test_eval_same_miou_from_torch_and_onnxruntime(world, tmp_path):
    meta = segnet1_meta(S1, VOC_TARGET_CLASSES)
    ckpt = _save(tmp_path / "s1.pt", meta, 2)
    r = CliRunner().invoke(export_cli, ["--model", str(ckpt), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    res = {}
    for name, model in (("torch", ckpt), ("ort", tmp_path / "exp" / "segnet1.onnx")):
        r = CliRunner().invoke(eval_cli, ["--model", str(model), "--voc-root", str(world.voc_root),
                                          "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        res[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert res["torch"]["predictor"]["backend"] == "torch"
    assert res["ort"]["predictor"]["provider"] == "CPUExecutionProvider"
    assert abs(res["torch"]["miou"] - res["ort"]["miou"]) <= 0.0001  # within 0.01 points
    assert (tmp_path / "ort" / "confusion.png").stat().st_size > 1000
    # the torch evaluator agrees with the in-process one
    from boxseg.inference import evaluate_segnet1

    images = ImageSet(VOCDataset(world.voc_root, "val"), NUM_VOC_CLASSES)
    assert evaluate_segnet1(_model(meta, 2), images, meta["input_size"], torch.device("cpu")).miou == pytest.approx(
        res["torch"]["miou"], abs=1e-12)


def test_eval_flip_and_scales_change_the_prediction_not_the_protocol(world, tmp_path):
    ckpt = _save(tmp_path / "s1.pt", segnet1_meta(S1, VOC_TARGET_CLASSES), 2)
    outs = {}
    for name, extra in (("plain", []), ("tta", ["--flip", "--scales", "0.75,1"])):
        r = CliRunner().invoke(eval_cli, ["--model", str(ckpt), "--voc-root", str(world.voc_root),
                                          "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        outs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert outs["plain"]["pixels"] == outs["tta"]["pixels"]
    assert outs["tta"]["flip"] and outs["tta"]["scales"] == [0.75, 1.0]
    assert outs["plain"]["miou"] != outs["tta"]["miou"]


def test_propose_gives_identical_labels_from_onnxruntime(world, tmp_path):
    """boxseg-propose with exported SegNet2 (5 ch) and SegNet1 (dynamic size) = the checkpoints."""
    from boxseg.cli.propose import main as propose_cli

    s2 = _save(tmp_path / "s2.pt", segnet2_meta(S2, 5), 1)
    s1 = _save(tmp_path / "s1.pt", segnet1_meta(S1, VOC_TARGET_CLASSES), 2)
    for args in (["--model", str(s2)], ["--model", str(s1), "--dynamic-size"]):
        r = CliRunner().invoke(export_cli, [*args, "--out", str(tmp_path / "exp")])
        assert r.exit_code == 0, r.output
    base = ["--voc-root", str(world.voc_root), "--workers", "0", "--margin", "0.02", "--class-margin", "0.02"]
    runs = {"torch": ["--model", str(s2), "--segnet1", str(s1)],
            "ort": ["--model", str(tmp_path / "exp" / "segnet2_5ch.onnx"),
                    "--segnet1", str(tmp_path / "exp" / "segnet1_dynsize.onnx")]}
    for name, args in runs.items():
        r = CliRunner().invoke(propose_cli, [*args, *base, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    a = sorted((tmp_path / "torch").glob("*.png"))
    assert a and [p.read_bytes() for p in a] == [(tmp_path / "ort" / p.name).read_bytes() for p in a]
    # a static-size SegNet1 at SegNet2's size is a clear error
    r = CliRunner().invoke(export_cli, ["--model", str(s1), "--out", str(tmp_path / "exp")])
    r = CliRunner().invoke(propose_cli, ["--model", str(tmp_path / "exp" / "segnet2_5ch.onnx"),
                                         "--segnet1", str(tmp_path / "exp" / "segnet1.onnx"), *base,
                                         "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "--dynamic-size" in str(r.exception)


def test_aoti_package_loads_and_agrees_cpu(world, tmp_path):
    meta = segnet2_meta(S2, 4)
    ckpt = _save(tmp_path / "s2.pt", meta, 0)
    r = CliRunner().invoke(export_cli, ["--model", str(ckpt), "--out", str(tmp_path / "exp"), "--aoti",
                                        "--device", "cpu", "--batch", "4"])
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    pkg = tmp_path / "exp" / "segnet2.pt2"
    # loadable without boxseg's model code: torch alone
    runner = torch._inductor.aoti_load_package(str(pkg))
    x = _real_inputs(world, meta, 4)  # the package's static batch
    with torch.no_grad():
        ref = _model(meta, 0)(x)
    assert parity(ref, runner(x), "segnet2")["rel_diff"] <= 1e-4
    # the Predictor pads a short batch to the static one and splits a long one
    assert parity(ref[:3], load_predictor(pkg, "cpu")(x[:3]), "segnet2")["rel_diff"] <= 1e-4
    x6 = torch.cat([x, x[:2]])
    assert parity(torch.cat([ref, ref[:2]]), load_predictor(pkg, "cpu")(x6), "segnet2")["rel_diff"] <= 1e-4
    assert "aoti phase: torch.export" in r.output and "aoti phase: AOTInductor compile" in r.output


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the missing-package path cannot be exercised")
def test_trt_missing_is_a_clear_error(tmp_path):
    ckpt = _save(tmp_path / "s2.pt", segnet2_meta(S2, 4), 0)
    r = CliRunner().invoke(export_cli, ["--model", str(ckpt), "--out", str(tmp_path / "exp"), "--trt"])
    assert r.exit_code == 6 and "TensorRT is not installed" in r.output and "pip install tensorrt" in r.output


@pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()),
                    reason=("tensorrt is not installed (pip install tensorrt; NVIDIA's wheels)" if not HAS_TRT else "")
                    + ("; " if not HAS_TRT and not torch.cuda.is_available() else "")
                    + ("no CUDA GPU (TensorRT needs one)" if not torch.cuda.is_available() else ""))
def test_trt_engine_fp16_parity(world, tmp_path):
    meta = segnet2_meta(S2, 4)
    ckpt = _save(tmp_path / "s2.pt", meta, 0)
    r = CliRunner().invoke(export_cli, ["--model", str(ckpt), "--out", str(tmp_path / "exp"), "--trt", "--fp16",
                                        "--batch", "4"])
    assert r.exit_code == 0, r.output
    pred = load_predictor(tmp_path / "exp" / "segnet2.fp16.engine", "cuda")
    x = _real_inputs(world, meta, 8)
    with torch.no_grad():
        ref = _model(meta, 0)(x)
    p = parity(ref, pred(x.cuda()), "segnet2")
    assert p["label_agreement"] >= 0.995 and p["mask_iou"] >= 0.99
    assert (tmp_path / "exp" / "segnet2.fp16.timing.cache").stat().st_size > 0


def test_hostile_artifacts_are_refused(tmp_path):
    meta = segnet2_meta(S2, 4)
    model = _model(meta, 0)
    good = tmp_path / "exp" / "m.onnx"
    good.parent.mkdir()
    export_onnx(model, meta, good)
    # metadata naming another kind / another input size
    with pytest.raises(DataError, match="segnet2 model, but a segnet1 is expected"):
        load_predictor(good, "cpu", expect_kind="segnet1")
    side = good.with_suffix(".onnx.json")
    bad_meta = {**json.loads(side.read_text()), "input_size": 64}
    (tmp_path / "exp" / "m2.onnx").write_bytes(good.read_bytes())
    (tmp_path / "exp" / "m2.onnx.json").write_text(json.dumps(bad_meta))
    with pytest.raises(DataError, match="does not match its metadata"):
        load_predictor(tmp_path / "exp" / "m2.onnx", "cpu")
    # a symlinked model file
    os.symlink(good, tmp_path / "exp" / "link.onnx")
    shutil.copy(side, tmp_path / "exp" / "link.onnx.json")
    with pytest.raises(DataError, match="symbolic link"):
        load_predictor(tmp_path / "exp" / "link.onnx", "cpu")
    # the same for every exported kind, before its runtime is imported or the file read
    for suffix in (".engine", ".pt2"):
        os.symlink(good, tmp_path / "exp" / f"link{suffix}")
        with pytest.raises(DataError, match=f"link\\{suffix}: refused: the .* artifact is a symbolic link"):
            load_predictor(tmp_path / "exp" / f"link{suffix}", "cpu")
    # external data outside the folder, and external data through a symlink
    for name, loc in (("out.onnx", "../secret.bin"), ("sym.onnx", "weights.bin")):
        m = onnx.load(str(good))  # (saving with external data changes the proto in place)
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        onnx.save_model(m, str(d / name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
        shutil.copy(side, d / f"{name}.json")
        if loc.startswith(".."):
            mm = onnx.load(str(d / name), load_external_data=False)
            for t in mm.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = loc
            onnx.save_model(mm, str(d / name))
            with pytest.raises(DataError, match="outside"):
                load_predictor(d / name, "cpu")
        else:
            (d / "weights.bin").rename(tmp_path / "real.bin")
            os.symlink(tmp_path / "real.bin", d / "weights.bin")
            with pytest.raises(DataError, match="symbolic link"):
                load_predictor(d / name, "cpu")
    # missing metadata
    (tmp_path / "exp" / "nometa.onnx").write_bytes(good.read_bytes())
    with pytest.raises(DataError, match="metadata file"):
        load_predictor(tmp_path / "exp" / "nometa.onnx", "cpu")
