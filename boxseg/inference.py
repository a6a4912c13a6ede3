"""SegNet1 inference through a Predictor (probabilities, mIoU), baseline label folders, and
scoring a label folder against ground truth (SegNet2 proposals: boxseg.propose)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from boxseg.data.files import read_label, write_label_png
from boxseg.data.images import ImageSet
from boxseg.data.transforms import MEAN_U8
from boxseg.errors import NonFiniteOutput
from boxseg.metrics import ConfusionMatrix, SegScores
from boxseg.predict import Predictor, as_predictor
from boxseg.predict.image import letterbox, letterbox_params, normalize, probabilities

if TYPE_CHECKING:
    from boxseg.crf import CRFParams


def _chunks(n: int, size: int) -> Iterator[range]:
    for s in range(0, n, size):
        yield range(s, min(n, s + size))


@torch.no_grad()
def segnet1_probs(model: Predictor, images: list[np.ndarray], test_size: int, device: torch.device,
                  scales: tuple[float, ...] = (1.0,), flip: bool = False) -> list[torch.Tensor]:
    """Softmax (C, h, w) per image (float32, on the device) from a Predictor. Each image
    (scaled by each of `scales`, and mirrored with `flip`) is padded to test_size (scaled down
    only if larger); the probabilities are mapped back to the image and averaged."""
    from boxseg.data.transforms import resize

    model = as_predictor(model, "segnet1", test_size, device)
    sums: list[torch.Tensor | None] = [None] * len(images)
    for s in scales:
        for mirrored in ((False, True) if flip else (False,)):
            views = []
            for im in images:
                v = im if s == 1.0 else resize(im, max(1, round(im.shape[0] * s)), max(1, round(im.shape[1] * s)), False)
                views.append(np.ascontiguousarray(v[:, ::-1]) if mirrored else v)
            lbs = [letterbox_params(*v.shape[:2], test_size, upscale=False) for v in views]
            canvas = np.stack([letterbox(v, lb, MEAN_U8) for v, lb in zip(views, lbs)])
            logits = model(normalize(torch.from_numpy(canvas).to(device)))
            for k, lb in enumerate(lbs):
                p = probabilities(logits[k], lb)
                if mirrored:
                    p = p.flip(-1)
                if p.shape[-2:] != images[k].shape[:2]:
                    p = torch.nn.functional.interpolate(p[None], size=images[k].shape[:2], mode="bilinear",
                                                        align_corners=False)[0]
                sums[k] = p if sums[k] is None else sums[k] + p
    n = len(scales) * (2 if flip else 1)
    return [t / n for t in sums]


def evaluate_segnet1(model: Predictor, images: ImageSet, test_size: int, device: torch.device, batch: int = 16,
                     scales: tuple[float, ...] = (1.0,), flip: bool = False, progress: bool = False,
                     conf: ConfusionMatrix | None = None, crf: "CRFParams | None" = None,
                     save_dir: Path | None = None) -> SegScores:
    """mIoU of SegNet1 (a Predictor) over a split with ground truth; with `crf`, each image's
    probabilities are refined by boxseg.crf.dense_crf first. With `save_dir`, each image's
    predicted labels (after the CRF) are written there as `ID.png` in the VOC palette, the
    format of the ground truth, so any scorer can check the mIoU."""
    from tqdm import tqdm

    from boxseg.crf import dense_crf

    model = as_predictor(model, "segnet1", test_size, device, batch=batch)

    conf = conf if conf is not None else ConfusionMatrix(images.num_classes)
    bad: list[str] = []
    for idx in tqdm(list(_chunks(len(images), batch)), desc="eval", disable=not progress, leave=False):
        items = [images[i] for i in idx]
        for item, p in zip(items, segnet1_probs(model, [it.image for it in items], test_size, device, scales, flip)):
            best, pred = p.max(0)  # argmax's indices (the first of equal maxima) at a seventh of its time on CPU
            # a pixel's probabilities are all finite or all NaN (a softmax, or a mean of softmaxes),
            # and the max propagates NaN: the maxima are finite exactly when every probability is
            if not torch.isfinite(best).all():  # argmax of NaN would be a silent wrong answer
                bad.append(item.id)
                continue
            if crf is not None:
                pred = dense_crf(p, torch.from_numpy(item.image).to(device), crf).max(0).indices
            pred = pred.cpu()
            if save_dir is not None:
                write_label_png(save_dir / f"{item.id}.png", pred.numpy().astype(np.uint8))
            conf.update(pred, torch.from_numpy(item.mask))
    if bad:
        raise NonFiniteOutput(bad, getattr(model, "precision", "fp32"))
    return conf.scores()


def score_label_dir(label_dir: Path, images: ImageSet, missing_ok: bool = False,
                    conf: ConfusionMatrix | None = None) -> tuple[SegScores, float]:
    """mIoU of a folder of label PNGs (proposals) against the ground truth of `images`, over
    the pixels the proposals label, and their coverage (the fraction not marked 255)."""
    conf = conf if conf is not None else ConfusionMatrix(images.num_classes)
    for i in range(len(images)):
        path = label_dir / f"{images.id(i)}.png"
        if missing_ok and not path.exists():
            continue
        truth = images.ground_truth(i)  # the image itself is not decoded
        if truth is None:
            continue
        label = read_label(path, images.num_classes, truth.shape)
        conf.update(label, truth, pred_ignore=True)
    return conf.scores(), conf.coverage()


def write_baseline(name: str, images: ImageSet, out_dir: Path, centre_fraction: float, progress: bool = False,
                   indices: list[int] | None = None) -> dict:
    """Write a baseline's label PNGs (box, box-centre, grabcut) for images (of `indices`,
    default all) that lack one."""
    from tqdm import tqdm

    from boxseg.baselines import baseline_labels

    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in tqdm(range(len(images)) if indices is None else indices, desc=name, unit="img", disable=not progress,
                  leave=False):
        path = out_dir / f"{images.id(i)}.png"
        if path.exists():
            continue
        item = images[i]
        write_label_png(path, baseline_labels(name, item.image, item.boxes, item.labels, centre_fraction))
        written += 1
    return {"written": written}


def label_reader(label_dir: Path, images: ImageSet):
    """label_of(i) for SegNet1 training from a proposal folder."""
    def label_of(i: int) -> np.ndarray:
        item = images[i]
        return read_label(label_dir / f"{item.id}.png", images.num_classes, item.image.shape[:2])
    return label_of


def gt_reader(images: ImageSet):
    def label_of(i: int) -> np.ndarray:
        mask = images[i].mask
        if mask is None:
            raise ValueError(f"{images.id(i)}: no ground-truth mask")
        return mask
    return label_of

