"""evaluate_segnet1 (boxseg-eval, the training rounds' scores) against the plain reference:
each image's probabilities written out (its uint8 canvas normalised by torch, one image a
batch; `segnet1_probs` gives the same), labels by argmax, one confusion update an image. The confusion matrices and the saved label PNGs must be identical whatever the batch,
with scales and flip too. The trained tiny SegNet1 of tests/fixtures: a random network
leaves too many pixels at a near-tie to say anything about labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from boxseg.data.files import read_label
from boxseg.data.transforms import MEAN_U8, resize
from boxseg.data.images import ImageSet
from boxseg.data.voc import NUM_VOC_CLASSES, VOCDataset
from boxseg.inference import evaluate_segnet1, segnet1_probs
from boxseg.metrics import ConfusionMatrix
from boxseg.predict import load_predictor
from boxseg.predict.image import letterbox, letterbox_params, normalize, probabilities

MODEL = Path(__file__).parent / "fixtures" / "tiny_segnet1.pt"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(world):
    pred = load_predictor(MODEL, CPU, "fp32")
    images = ImageSet(VOCDataset(world.voc_root, "val"), NUM_VOC_CLASSES)
    return pred, images


def _probs(pred, image, scales, flip):
    """One image's averaged softmax, written out: the uint8 canvas normalised by torch."""
    size, views = pred.meta["input_size"], []
    for s in scales:
        v = image if s == 1.0 else resize(image, max(1, round(image.shape[0] * s)), max(1, round(image.shape[1] * s)),
                                          False)
        views += [(np.ascontiguousarray(v[:, ::-1]), True), (v, False)][::-1][: 2 if flip else 1]
    total = 0
    for v, mirrored in views:
        lb = letterbox_params(*v.shape[:2], size, upscale=False)
        logits = pred(normalize(torch.from_numpy(letterbox(v, lb, MEAN_U8)[None])))
        p = probabilities(logits[0], lb)
        p = p.flip(-1) if mirrored else p
        if p.shape[-2:] != image.shape[:2]:
            p = torch.nn.functional.interpolate(p[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
        total = total + p
    return total / len(views)


def _reference(pred, images, scales=(1.0,), flip=False):
    conf, labels = ConfusionMatrix(images.num_classes), {}
    for i in range(len(images)):
        item = images[i]
        p = _probs(pred, item.image, scales, flip)
        assert torch.equal(p, segnet1_probs(pred, [item.image], pred.meta["input_size"], CPU, scales, flip)[0])
        labels[item.id] = p.argmax(0).numpy().astype(np.uint8)
        conf.update(torch.from_numpy(labels[item.id]).long(), torch.from_numpy(item.mask))
    return conf, labels


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_eval_equals_the_image_by_image_reference(setup, tmp_path, batch):
    pred, images = setup
    ref, labels = _reference(pred, images)
    assert 0.3 < ref.scores().miou < 1  # a trained network: the labels say something
    conf = ConfusionMatrix(images.num_classes)
    scores = evaluate_segnet1(pred, images, pred.meta["input_size"], CPU, batch, conf=conf, save_dir=tmp_path)
    assert torch.equal(conf.mat, ref.mat)
    assert scores.miou == ref.scores().miou
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(labels)
    for sample_id, lab in labels.items():
        assert np.array_equal(read_label(tmp_path / f"{sample_id}.png", NUM_VOC_CLASSES, lab.shape), lab), sample_id


def test_eval_with_scales_and_flip_equals_the_reference(setup):
    pred, images = setup
    ref, _ = _reference(pred, images, (0.75, 1.0), True)
    conf = ConfusionMatrix(images.num_classes)
    evaluate_segnet1(pred, images, pred.meta["input_size"], CPU, 4, (0.75, 1.0), True, conf=conf)
    assert torch.equal(conf.mat, ref.mat)


def test_eval_cli_workers_change_nothing_but_the_threads(world, tmp_path):
    import json

    from click.testing import CliRunner

    from boxseg.cli.eval import main as eval_cli

    got = {}
    for w in ("1", "3"):
        r = CliRunner().invoke(eval_cli, ["--model", str(MODEL), "--voc-root", str(world.voc_root), "--device", "cpu",
                                          "--batch", "4", "--workers", w, "--out", str(tmp_path / w)])
        assert r.exit_code == 0, r.output
        got[w] = json.loads((tmp_path / w / "results.json").read_text())
    assert got["1"]["miou"] == got["3"]["miou"] and got["1"]["pixels"] == got["3"]["pixels"] > 0
    assert got["1"]["iou"] == got["3"]["iou"]


def test_eval_of_a_split_missing_a_ground_truth_names_the_file(world_copy, tmp_path):
    """A model's mIoU needs every image's ground truth: a missing mask is a bad-input error
    naming it (it was a traceback from the decoder thread), or with --skip-bad skipped and listed."""
    import json

    from click.testing import CliRunner

    from boxseg.cli.eval import main as eval_cli

    root = world_copy.voc_root
    sample_id = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    (mask,) = root.glob(f"SegmentationClass*/{sample_id}.png")
    mask.unlink()
    args = ["--model", str(MODEL), "--voc-root", str(root), "--device", "cpu"]
    r = CliRunner().invoke(eval_cli, args)
    assert r.exit_code == 3 and f"{sample_id}.png: segmentation mask is missing" in r.output, r.output
    r = CliRunner().invoke(eval_cli, [*args, "--skip-bad", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    skipped = json.loads((tmp_path / "e" / "results.json").read_text())["bad_input"]
    assert sample_id in json.dumps(skipped), skipped
