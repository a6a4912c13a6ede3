"""Batched inference with torch modules: SegNet1 label maps / scores, and SegNet2 proposals
over (image, class) pairs from many images."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from boxseg.config import ProposalConfig
from boxseg.data.boxes import union_box_mask
from boxseg.data.files import read_label, write_label_png
from boxseg.data.images import ImageSet
from boxseg.data.transforms import MEAN_U8, letterbox, letterbox_params, normalize, unletterbox
from boxseg.metrics import ConfusionMatrix, SegScores
from boxseg.proposals import merge_foreground
from boxseg.train.segnet2 import segnet2_inputs


def _chunks(n: int, size: int) -> Iterator[range]:
    for s in range(0, n, size):
        yield range(s, min(n, s + size))


@torch.no_grad()
def segnet1_probs(model: torch.nn.Module, images: list[np.ndarray], test_size: int, device: torch.device) -> list[torch.Tensor]:
    """Softmax (C, h, w) per image. Images are padded to test_size (scaled down only if larger)."""
    lbs = [letterbox_params(*im.shape[:2], test_size, upscale=False) for im in images]
    canvas = np.stack([letterbox(im, lb, MEAN_U8) for im, lb in zip(images, lbs)])
    x = normalize(torch.from_numpy(canvas).to(device))
    logits = model(x).float()
    return [unletterbox(logits[k], lb).softmax(0).cpu() for k, lb in enumerate(lbs)]


def evaluate_segnet1(model: torch.nn.Module, images: ImageSet, test_size: int, device: torch.device,
                     batch: int = 16) -> SegScores:
    """mIoU of SegNet1 over a split with ground truth."""
    model.eval()
    conf = ConfusionMatrix(images.num_classes)
    for idx in _chunks(len(images), batch):
        items = [images[i] for i in idx]
        for item, p in zip(items, segnet1_probs(model, [it.image for it in items], test_size, device)):
            conf.update(p.argmax(0), torch.from_numpy(item.mask))
    return conf.scores()


def score_label_dir(label_dir: Path, images: ImageSet) -> tuple[SegScores, float]:
    """mIoU of a folder of label PNGs (proposals) against the ground truth of `images`, over
    the pixels the proposals label, and their coverage (the fraction not marked 255)."""
    conf = ConfusionMatrix(images.num_classes)
    for i in range(len(images)):
        item = images[i]
        if item.mask is None:
            continue
        label = read_label(label_dir / f"{item.id}.png", images.num_classes, item.mask.shape)
        conf.update(label, item.mask, pred_ignore=True)
    return conf.scores(), conf.coverage()


@torch.no_grad()
def propose_learned(segnet2: torch.nn.Module, segnet1: torch.nn.Module | None, images: ImageSet, out_dir: Path,
                    size: int, cfg: ProposalConfig, device: torch.device, progress: bool = False) -> dict:
    """Write `out_dir/ID.png` for every image that lacks one: SegNet2's foreground map for
    each (image, class with boxes), batched across images, merged by `merge_foreground`."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    segnet2.eval()
    if segnet1 is not None:
        segnet1.eval()
    todo = [i for i in range(len(images)) if not (out_dir / f"{images.id(i)}.png").exists()]
    pending: dict[int, dict] = {}
    queue: list[tuple[int, int]] = []
    written = 0

    def flush(pairs: list[tuple[int, int]]) -> None:
        nonlocal written
        imgs = torch.from_numpy(np.stack([pending[i]["canvas"] for i, _ in pairs])).to(device)
        boxes = torch.from_numpy(np.stack([pending[i]["boxmask"][m] for i, m in pairs])).to(device)
        cls = torch.tensor([m for _, m in pairs], device=device)
        logits = segnet2(segnet2_inputs(imgs, boxes, cls, segnet1)).float()
        fg = logits.softmax(1)[:, 1:2]
        for k, (i, m) in enumerate(pairs):
            st = pending[i]
            st["probs"][m] = unletterbox(fg[k], st["lb"])[0].cpu().numpy()
            if len(st["probs"]) == len(st["classes"]):
                item = st["item"]
                label = merge_foreground(np.stack([st["probs"][c] for c in st["classes"]]), st["classes"],
                                         item.boxes, item.labels, cfg.threshold, cfg.margin, cfg.class_margin, cfg.merge)
                write_label_png(out_dir / f"{item.id}.png", label)
                written += 1
                del pending[i]

    for i in tqdm(todo, desc="proposals", disable=not progress, leave=False):
        item = images[i]
        classes = sorted(set(item.labels.tolist()))
        if not classes:
            write_label_png(out_dir / f"{item.id}.png", np.zeros(item.image.shape[:2], np.uint8))
            written += 1
            continue
        lb = letterbox_params(*item.image.shape[:2], size)
        canvas = letterbox(item.image, lb, MEAN_U8)
        boxmask = {m: union_box_mask(item.boxes[item.labels == m] * lb.scale, size, size).astype(np.uint8)
                   for m in classes}
        pending[i] = {"item": item, "lb": lb, "canvas": canvas, "boxmask": boxmask, "classes": classes, "probs": {}}
        queue += [(i, m) for m in classes]
        while len(queue) >= cfg.batch:
            flush(queue[: cfg.batch])
            queue = queue[cfg.batch:]
    if queue:
        flush(queue)
    return {"written": written, "skipped_existing": len(images) - len(todo)}


def write_baseline(name: str, images: ImageSet, out_dir: Path, centre_fraction: float, progress: bool = False) -> dict:
    """Write a baseline's label PNGs (box, box-centre, grabcut) for images that lack one."""
    from tqdm import tqdm

    from boxseg.baselines import baseline_labels

    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in tqdm(range(len(images)), desc=name, disable=not progress, leave=False):
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

