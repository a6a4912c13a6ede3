"""The one inference core: every backend through the same Predictor agrees with eager torch
(fp32: identical labels, logits within 1e-4 x max|ref|), the device merge equals the numpy
reference, and no consumer bypasses the Predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from boxseg.cli.propose import main as propose_cli
from boxseg.config import ProposalConfig
from boxseg.data.classes import VOC_TARGET_CLASSES
from boxseg.data.voc import VOCDataset
from boxseg.export.artifacts import open_predictor
from boxseg.models.meta import segnet1_meta, segnet2_meta
from boxseg.predict import load_predictor
from boxseg.predict.base import batch_bucket
from boxseg.proposals import merge_foreground, merge_foreground_fast, merge_foreground_torch, range_masks

from test_export import _real_inputs
from test_propose import S1, S2, _labels, _model, _save

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    return {"segnet1": (_save(d / "s1.pt", segnet1_meta(S1, VOC_TARGET_CLASSES), 2), segnet1_meta(S1, VOC_TARGET_CLASSES)),
            "segnet2": (_save(d / "s2.pt", segnet2_meta(S2, 4), 0), segnet2_meta(S2, 4))}


@pytest.mark.parametrize("kind", ["segnet1", "segnet2"])
def test_every_cpu_backend_agrees_with_eager_torch(world, models, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("BOXSEG_CACHE", str(tmp_path / "cache"))
    ckpt, meta = models[kind]
    x = _real_inputs(world, meta, 3)  # 3: compile and the static AOTI package pad it to 4
    ref = load_predictor(ckpt, CPU, "fp32")(x)
    for backend in ("compile", "onnxruntime", "aoti"):
        pred = open_predictor(ckpt, CPU, "fp32", backend, kind, batch=4)
        assert pred.backend == backend
        out = pred(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape, backend
        rel = float((out - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-4, (backend, rel)
        assert torch.equal(out.argmax(1), ref.argmax(1)), backend


def test_batch_buckets_and_padding_give_the_unpadded_answer(models):
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert batch_bucket(100, 64) == 64
    ckpt, meta = models["segnet2"]
    pred = load_predictor(ckpt, CPU, "fp32", "compile", batch=4)
    x = torch.randn(6, 4, S2.input_size, S2.input_size)
    ref = load_predictor(ckpt, CPU, "fp32")(x)
    out = pred(x)  # split 4 + 2
    assert out.shape == ref.shape and float((out - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_a_checkpoint_refuses_an_artifact_backend_without_export(models):
    from boxseg.errors import DataError

    with pytest.raises(DataError, match="export it"):
        load_predictor(models["segnet2"][0], CPU, "fp32", "onnxruntime")


@pytest.mark.parametrize("backend", ["compile", "onnxruntime"])
def test_propose_backends_write_the_labels_of_torch(world, models, tmp_path, monkeypatch, backend):
    monkeypatch.setenv("BOXSEG_CACHE", str(tmp_path / "cache"))
    base = ["--model", str(models["segnet2"][0]), "--voc-root", str(world.voc_root), "--device", "cpu",
            "--workers", "0", "--batch", "8"]
    r = CliRunner().invoke(propose_cli, [*base, "--out", str(tmp_path / "torch")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(propose_cli, [*base, "--out", str(tmp_path / backend), "--backend", backend])
    assert r.exit_code == 0, r.output
    assert _labels(tmp_path / backend) == _labels(tmp_path / "torch")


# -- the device merge ----------------------------------------------------------------------------

def _merge_both(probs, classes, boxes, labels, **kw):
    from boxseg.data.boxes import box_pixel_range

    k, h, w = probs.shape
    ref = merge_foreground(probs, classes, boxes, labels, **kw)
    ranges = np.array([box_pixel_range(b, h, w) for b in boxes], np.int64).reshape(-1, 4)
    inside = range_masks([ranges[labels == c] for c in classes], h, w, CPU)
    got = merge_foreground_torch(torch.from_numpy(probs), classes, inside, ranges, labels, **kw).numpy()
    if kw.get("mode", "ignore") == "ignore":  # the CPU pipeline's numpy twin: the same bytes too
        kw.pop("mode", None)
        fast = merge_foreground_fast(probs, classes, inside.numpy(), **kw)
        assert fast.dtype == np.uint8 and np.array_equal(fast, ref)
    return ref, got


@pytest.mark.parametrize("mode", ["ignore", "order"])
def test_device_merge_equals_numpy_on_random_overlapping_boxes(mode):
    rng = np.random.default_rng(0)
    for trial in range(40):
        h, w = rng.integers(5, 60, 2)
        n = int(rng.integers(1, 6))
        labels = rng.integers(1, 5, n)
        # boxes overlap the image, as the readers guarantee (clipped, or refused when wholly outside)
        x0, y0 = rng.uniform(-3, w - 1, n), rng.uniform(-3, h - 1, n)
        boxes = np.stack([x0, y0, x0 + rng.uniform(3, w, n), y0 + rng.uniform(3, h, n)], 1).astype(np.float32)
        classes = sorted(set(labels.tolist()))
        probs = rng.random((len(classes), h, w), dtype=np.float32)
        probs[:, :2] = np.float32(0.5)  # exact threshold and ties between classes
        probs[:, 2:4] = np.float32(0.4)  # exactly threshold - margin
        ref, got = _merge_both(probs, classes, boxes, labels, threshold=0.5, margin=0.1, class_margin=0.1, mode=mode)
        assert np.array_equal(ref, got), trial


@pytest.mark.parametrize("threshold,margin", [(0.5, 0.1), (0.5, 0.5), (0.5, 1.5), (-0.95, 0.1)])
def test_one_class_merge_equals_the_reference(threshold, margin):
    """merge_foreground_fast's one-class shortcut (no runner-up class): the same bytes, also
    where threshold - margin <= -1 makes the absent runner-up (-1) count as close."""
    rng = np.random.default_rng(1)
    for trial in range(20):
        h, w = rng.integers(5, 40, 2)
        n = int(rng.integers(1, 4))
        x0, y0 = rng.uniform(-3, w - 1, n), rng.uniform(-3, h - 1, n)
        boxes = np.stack([x0, y0, x0 + rng.uniform(3, w, n), y0 + rng.uniform(3, h, n)], 1).astype(np.float32)
        probs = rng.random((1, h, w), dtype=np.float32)
        probs[:, :2] = np.float32(threshold)
        probs[:, 2:4] = np.float32(threshold - margin)
        ref, got = _merge_both(probs, [7], boxes, np.full(n, 7), threshold=threshold, margin=margin, class_margin=2.0)
        assert np.array_equal(ref, got), trial
        if threshold - margin <= -1:  # the runner-up rule marks every pixel of the boxes "ignore"
            assert set(np.unique(ref)) == {0, 255} or set(np.unique(ref)) == {255}


def test_device_merge_equals_numpy_on_the_world(world):
    """SegNet2-like probabilities (a random network's, un-letterboxed) over the test world."""
    from boxseg.predict.image import letterbox_params, unletterbox

    ds = VOCDataset(world.voc_root, "train")
    g = torch.Generator().manual_seed(0)
    for i in range(len(ds)):
        s = ds[i]
        classes = sorted(set(np.asarray(s.labels).tolist()))
        h, w = s.image.shape[:2]
        low = torch.rand(len(classes), 24, 24, generator=g)
        probs = unletterbox(low, letterbox_params(h, w, 96)).numpy()
        ref, got = _merge_both(probs, classes, np.asarray(s.boxes, np.float32), np.asarray(s.labels))
        assert np.array_equal(ref, got), ds.ids[i]


@pytest.mark.parametrize("merge", ["ignore", "order"])
def test_post_processing_all_images_at_once_equals_image_by_image(world, merge):
    """The CUDA path merges a batch's images in one set of kernels over padded tensors; on
    CPU it goes image by image. Same bytes: labels, finite flags, instance masks and scores."""
    from boxseg.data.images import ImageSet
    from boxseg.data.voc import NUM_VOC_CLASSES
    from boxseg.propose import _Decoded, _post_process

    images = ImageSet(VOCDataset(world.voc_root, "train"), NUM_VOC_CLASSES)
    recs = [_Decoded(images, list(range(len(images))), 96)[k] for k in range(len(images))]
    g = torch.Generator().manual_seed(0)
    entries = []
    for rec in recs:
        rec.pop("canvas")
        k = len(rec["classes"])
        maps = torch.rand(k, 24, 24, generator=g)
        maps[:, :3] = 0.5  # exact threshold, and ties between classes
        entries.append((rec, maps if k else None, torch.rand(k, generator=g) > 0.2 if k else None))
    assert len({(r["lb"].h, r["lb"].w) for r in recs}) > 1 and max(len(r["classes"]) for r in recs) > 1
    cfg = ProposalConfig(merge=merge)
    one, lay1 = _post_process(entries, cfg, True, CPU, together=False)
    every, lay2 = _post_process(entries, cfg, True, CPU, together=True)
    assert (lay1.hmax, lay1.wmax) == (lay2.hmax, lay2.wmax) and lay1.images == lay2.images
    assert torch.equal(one, every)
    labels = one[sum(len(r["classes"]) for r in recs):][: len(recs) * lay1.hmax * lay1.wmax]
    assert int((labels == 255).sum()) > 0 if merge == "ignore" else int((labels == 255).sum()) == 0
    assert int(((labels > 0) & (labels < 255)).sum()) > 1000


# -- no consumer bypasses the Predictor ----------------------------------------------------------

def test_training_rounds_propose_what_boxseg_propose_writes(world, tmp_path):
    """The scheme's proposals between rounds are boxseg-propose's bytes for the same model,
    precision and data: both go through the same Predictor and pipeline."""
    import dataclasses

    from boxseg.config import preset
    from boxseg.train.alternate import Scheme, open_datasets

    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, segnet2=S2, segnet1=S1, proposals=ProposalConfig(batch=8), device="cpu")
    data = open_datasets(world.voc_root, world.coco_ann, world.coco_images, "train", "val", False, False)
    scheme = Scheme(cfg, tmp_path / "run", data, CPU)
    model = _model(segnet2_meta(S2, 4), 0)
    scheme.propose(model, None, data.train, tmp_path / "run" / "proposals" / "target_r1")
    ckpt = _save(tmp_path / "s2.pt", segnet2_meta(S2, 4), 0)
    r = CliRunner().invoke(propose_cli, ["--model", str(ckpt), "--voc-root", str(world.voc_root), "--device", "cpu",
                                         "--workers", "0", "--batch", "8", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    ours = _labels(tmp_path / "run" / "proposals" / "target_r1")
    assert ours and ours == _labels(tmp_path / "cli")
    import json

    done = json.loads((tmp_path / "run" / "proposals" / "target_r1" / "done.json").read_text())
    assert done["predictor"]["backend"] == "torch" and done["precision"] == "fp32"


def test_consumers_hold_no_model_runner_of_their_own():
    """Every consumer module reaches networks through boxseg.predict: none calls a torch module
    for inference itself (the training step is not inference)."""
    import boxseg.bench
    import boxseg.inference
    import boxseg.propose
    import boxseg.report.page

    for mod in (boxseg.bench, boxseg.inference, boxseg.propose, boxseg.report.page):
        src = open(mod.__file__).read()
        for banned in ("torch.autocast", "load_checkpoint_model(", ".half()", "torch.compile("):
            assert banned not in src, f"{mod.__name__} uses {banned}"


# -- onnxruntime builds ---------------------------------------------------------------------------

def test_missing_onnxruntime_is_a_clear_error(world, models, tmp_path, monkeypatch):
    import boxseg.predict.onnxruntime as ortmod
    from boxseg.export.onnx import export_onnx
    from boxseg.models.meta import load_checkpoint_model

    model, meta = load_checkpoint_model(models["segnet2"][0])
    export_onnx(model, meta, tmp_path / "s2.onnx")

    def missing():
        raise ortmod.OnnxRuntimeMissing("onnxruntime is not installed: pip install 'boxseg[cpu]'")
    monkeypatch.setattr(ortmod, "import_onnxruntime", missing)
    r = CliRunner().invoke(propose_cli, ["--model", str(tmp_path / "s2.onnx"), "--voc-root", str(world.voc_root),
                                         "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "o")])
    assert r.exit_code == 6 and "pip install 'boxseg[cpu]'" in r.output, r.output


def test_both_onnxruntime_builds_are_named_when_cuda_is_missing(models, tmp_path, monkeypatch):
    import importlib.metadata as md

    import boxseg.predict.onnxruntime as ortmod
    from boxseg.export.onnx import export_onnx
    from boxseg.models.meta import load_checkpoint_model

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "1.0" if name == "onnxruntime-gpu" else real(name))
    assert ortmod.installed_builds() == ["onnxruntime", "onnxruntime-gpu"]
    model, meta = load_checkpoint_model(models["segnet2"][0])
    export_onnx(model, meta, tmp_path / "s2.onnx")
    with pytest.raises(ortmod.ProviderFallback, match="both onnxruntime and onnxruntime-gpu are installed"):
        ortmod.OrtPredictor(tmp_path / "s2.onnx", meta, torch.device("cuda"), "fp16")


def test_onnxruntime_on_cpu_takes_the_commands_threads_and_does_not_spin(models, tmp_path):
    """onnxruntime would count the machine's cores itself and spin between runs; on CPU the
    Predictor gives it the threads the command set (--threads) and no spinning, which in
    boxseg-propose took the cores from decoding and post-processing."""
    from boxseg.export.onnx import export_onnx
    from boxseg.models.meta import load_checkpoint_model
    from boxseg.predict.onnxruntime import OrtPredictor

    model, meta = load_checkpoint_model(models["segnet2"][0])
    export_onnx(model, meta, tmp_path / "s2.onnx")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pred = OrtPredictor(tmp_path / "s2.onnx", meta, CPU, "fp32")
    finally:
        torch.set_num_threads(threads)
    opts = pred.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = torch.rand(2, meta["in_channels"], meta["input_size"], meta["input_size"])
    assert torch.allclose(pred(x), load_predictor(models["segnet2"][0], CPU, "fp32")(x), atol=1e-4)


def test_stream_predictors_of_each_backend(models, tmp_path):
    """Model streams (boxseg.propose) run batches at once: the eager Predictor is shared, an
    onnxruntime one on CPU gives a session each (1/n of the threads, made once and kept), a
    compiled one none (one set of buffers); each stream's logits are the Predictor's."""
    from boxseg.export.onnx import export_onnx
    from boxseg.models.meta import load_checkpoint_model
    from boxseg.predict.onnxruntime import OrtPredictor

    eager = load_predictor(models["segnet2"][0], CPU, "fp32")
    assert eager.streamable and eager.for_streams(3) == [eager] * 3
    compiled = load_predictor(models["segnet2"][0], CPU, "fp32", "compile", batch=4)
    assert not compiled.streamable and compiled.for_streams(2) is None
    model, meta = load_checkpoint_model(models["segnet2"][0])
    export_onnx(model, meta, tmp_path / "s2.onnx")
    ort = OrtPredictor(tmp_path / "s2.onnx", meta, CPU, "fp32")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        streams = ort.for_streams(2)
    finally:
        torch.set_num_threads(threads)
    assert len(streams) == 2 and len({id(p) for p in streams} | {id(ort)}) == 3
    assert [p.session.get_session_options().intra_op_num_threads for p in streams] == [1, 1]
    assert [id(p) for p in ort.for_streams(2)] == [id(p) for p in streams]  # kept, not loaded again
    x = torch.rand(2, meta["in_channels"], meta["input_size"], meta["input_size"])
    assert all(torch.equal(p(x), ort(x)) for p in streams)
