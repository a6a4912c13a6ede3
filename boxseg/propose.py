"""Region proposals at scale: every (image, class with boxes) pair through SegNet2, batched
across images, merged into one label map per image (METHOD.md).

The pipeline, per fixed-size batch of pairs:
  DataLoader workers decode each image, letterbox it to the network size (uint8) and turn
  its boxes into integer pixel ranges on the canvas;
  the device receives each image of the batch once as uint8, normalises it, builds the box
  mask of every pair from the ranges, runs SegNet1 once per image for the score-map channel
  (round >= 2), runs SegNet2 on the pairs, and maps the foreground probabilities back to
  the image exactly (crop the letterbox, resize to the original size);
  the host merges an image's class maps (`merge_foreground`) as soon as all its pairs are
  done, and a thread pool writes the label PNG atomically (and the per-box instance masks).
An image whose PNG exists is not computed again, so a rerun completes only what is missing.
Outputs do not depend on the batch size: every pair's computation is independent of the
others in its batch (eval-mode networks), which the tests check bitwise on CPU fp32.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from boxseg.config import ProposalConfig
from boxseg.data.boxes import box_pixel_range
from boxseg.data.coco import encode_rle
from boxseg.data.files import write_bytes_atomic, write_label_png
from boxseg.data.images import ImageSet
from boxseg.data.transforms import MEAN_U8, Letterbox, letterbox, letterbox_params, unletterbox
from boxseg.errors import BadInputLog, DataError
from boxseg.faults import failpoint
from boxseg.proposals import instance_masks, merge_foreground
from boxseg.train.segnet2 import segnet2_inputs

Model = Callable[[torch.Tensor], torch.Tensor]  # float (B, C, S, S) -> logits (B, K, S/s, S/s)
PRECISIONS = ("fp32", "fp16", "bf16")


class _Decoded(Dataset):
    """Worker side: decode, letterbox, box pixel ranges on the canvas. Errors are returned
    as records (not raised in the worker) so the main process reports them with the file."""

    def __init__(self, images: ImageSet, indices: list[int], size: int):
        self.dataset, self.ids, self.indices, self.size = images.dataset, images, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        sample_id = self.ids.id(i)
        try:
            s = self.dataset[i]
        except DataError as e:
            return {"index": i, "id": sample_id, "error": (str(e.path), e.problem)}
        h, w = s.image.shape[:2]
        lb = letterbox_params(h, w, self.size)
        labels = np.asarray(s.labels, np.int64)
        boxes = np.asarray(s.boxes, np.float32).reshape(-1, 4)
        ranges = np.array([box_pixel_range(b * lb.scale, self.size, self.size) for b in boxes], np.int64).reshape(-1, 4)
        return {"index": i, "id": sample_id, "canvas": letterbox(s.image, lb, MEAN_U8), "lb": lb,
                "boxes": boxes, "labels": labels, "ranges": ranges, "classes": sorted(set(labels.tolist()))}


def _first(batch: list[dict]) -> dict:
    return batch[0]


@dataclass
class _Pending:
    rec: dict
    probs: dict[int, np.ndarray] = field(default_factory=dict)


def box_masks(ranges: list[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """float (P, S, S): 1 inside any of each pair's boxes, given as pixel ranges r0, r1, c0, c1
    (the rows/cols `union_box_mask` fills), built on the device."""
    kmax = max(1, max(len(r) for r in ranges))
    padded = np.zeros((len(ranges), kmax, 4), np.int64)  # empty range (0, 0, 0, 0) for padding
    for p, r in enumerate(ranges):
        padded[p, : len(r)] = r
    t = torch.from_numpy(padded).to(device)
    yy = torch.arange(size, device=device).view(1, 1, size, 1)
    xx = torch.arange(size, device=device).view(1, 1, 1, size)
    r0, r1, c0, c1 = (t[..., j].view(len(ranges), kmax, 1, 1) for j in range(4))
    inside = (yy >= r0) & (yy < r1) & (xx >= c0) & (xx < c1)
    return inside.any(1).float()


def autocast_for(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


@dataclass
class ProposalRun:
    """What `propose` did; the manifest is built from it."""
    written: int = 0
    skipped_existing: int = 0
    pairs: int = 0
    failed: list[dict] = field(default_factory=list)     # non-finite outputs, nothing written
    seconds: float = 0.0
    model_seconds: float = 0.0

    def to_dict(self) -> dict:
        d = {"written": self.written, "skipped_existing": self.skipped_existing, "pairs": self.pairs,
             "failed": self.failed, "seconds": round(self.seconds, 3), "model_seconds": round(self.model_seconds, 3)}
        if self.seconds > 0:
            d["images_per_s"] = round(self.written / self.seconds, 2)
            d["pairs_per_s"] = round(self.pairs / self.seconds, 2)
        return d


@torch.no_grad()
def propose(segnet2: Model, segnet1: Model | None, images: ImageSet, out_dir: Path, size: int, cfg: ProposalConfig,
            device: torch.device, precision: str = "fp32", workers: int = 0, instances: bool = False,
            skip_bad: bool = False, log: BadInputLog | None = None, shard: tuple[int, int] = (0, 1),
            progress: bool = False, writers: int = 2) -> ProposalRun:
    """Write `out_dir/ID.png` (and with `instances`, `out_dir/instances/ID.json`) for every
    image of this shard that lacks one. `segnet2` / `segnet1` are torch modules or any
    Predictor with the same call signature. A bad image raises DataError naming the file,
    or with `skip_bad` is logged in `log` and skipped."""
    from tqdm import tqdm

    log = log if log is not None else BadInputLog()
    out_dir.mkdir(parents=True, exist_ok=True)
    if instances:
        (out_dir / "instances").mkdir(exist_ok=True)
    for m in (segnet2, segnet1):
        if isinstance(m, torch.nn.Module):
            m.eval()
    rank, world = shard
    mine = list(range(rank, len(images), world))
    todo = [i for i in mine if not _done(out_dir, images.id(i), instances)]
    run = ProposalRun(skipped_existing=len(mine) - len(todo))
    loader = DataLoader(_Decoded(images, todo, size), batch_size=1, collate_fn=_first, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    pending: OrderedDict[int, _Pending] = OrderedDict()
    queue: list[tuple[int, int]] = []
    pool = ThreadPoolExecutor(max(1, writers))
    futures: list[Future] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="proposals", unit="img", disable=not progress, leave=False)

    def finish(i: int) -> None:
        st = pending.pop(i)
        rec = st.rec
        lb: Letterbox = rec["lb"]
        probs = (np.stack([st.probs[c] for c in rec["classes"]]) if rec["classes"]
                 else np.zeros((0, lb.h, lb.w), np.float32))  # an image without boxes: all background
        futures.append(pool.submit(_write_image, out_dir, rec, probs, cfg, instances))
        run.written += 1
        bar.update(1)

    def flush(pairs: list[tuple[int, int]]) -> None:
        tm = time.perf_counter()
        order = list(dict.fromkeys(i for i, _ in pairs))         # the batch's images, each once
        pos = {i: k for k, i in enumerate(order)}
        canvases = torch.from_numpy(np.stack([pending[i].rec["canvas"] for i in order])).to(device)
        img_idx = torch.tensor([pos[i] for i, _ in pairs], device=device)
        cls = torch.tensor([m for _, m in pairs], device=device)
        ranges = [pending[i].rec["ranges"][pending[i].rec["labels"] == m] for i, m in pairs]
        with autocast_for(device, precision):
            logits = segnet2(segnet2_inputs(canvases, box_masks(ranges, size, device), cls, segnet1, img_idx))
        fg = logits.float().softmax(1)[:, 1]
        bad = ~torch.isfinite(fg.flatten(1)).all(1)
        for k in bad.nonzero().flatten().tolist():
            i, m = pairs[k]
            run.failed.append({"id": pending[i].rec["id"], "class": m,
                               "problem": f"non-finite network output at {precision} (overflow?); not written"})
        # map back per image: one resize for all of an image's classes in this batch
        for i in order:
            ks = [k for k, (j, _) in enumerate(pairs) if j == i]
            maps = unletterbox(fg[ks], pending[i].rec["lb"]).cpu().numpy()
            for k, mp in zip(ks, maps):
                pending[i].probs[pairs[k][1]] = mp
        run.pairs += len(pairs)
        run.model_seconds += time.perf_counter() - tm
        failpoint("propose.batch")
        failed_ids = {f["id"] for f in run.failed}
        for i in order:
            st = pending.get(i)
            if st is not None and len(st.probs) == len(st.rec["classes"]):
                if st.rec["id"] in failed_ids:
                    pending.pop(i)
                    bar.update(1)
                else:
                    finish(i)

    try:
        for rec in loader:
            if "error" in rec:
                err = DataError(*rec["error"])
                if not skip_bad:
                    raise err
                log.skip(err, item=rec["id"])
                bar.update(1)
                continue
            i = rec["index"]
            pending[i] = _Pending(rec)
            if not rec["classes"]:
                finish(i)
                continue
            queue += [(i, m) for m in rec["classes"]]
            while len(queue) >= cfg.batch:
                flush(queue[: cfg.batch])
                queue = queue[cfg.batch:]
            _reap(futures)
        if queue:
            flush(queue)
        for f in futures:
            f.result()  # re-raise a write error here
    finally:
        pool.shutdown(wait=True)
        bar.close()
    run.seconds = time.perf_counter() - t0
    return run


def _reap(futures: list[Future]) -> None:
    """Drop finished writes (re-raising a write error) so the list stays short."""
    still = []
    for f in futures:
        if f.done():
            f.result()
        else:
            still.append(f)
    futures[:] = still


def _done(out_dir: Path, sample_id: str, instances: bool) -> bool:
    return (out_dir / f"{sample_id}.png").exists() and (not instances or (out_dir / "instances" / f"{sample_id}.json").exists())


def _write_image(out_dir: Path, rec: dict, probs: np.ndarray, cfg: ProposalConfig, instances: bool) -> None:
    """Merge and write one image's outputs; the PNG goes last since its presence marks the image done."""
    if not rec["classes"]:
        label = np.zeros(probs.shape[1:], np.uint8)
    else:
        label = merge_foreground(probs, rec["classes"], rec["boxes"], rec["labels"], cfg.threshold, cfg.margin,
                                 cfg.class_margin, cfg.merge)
    if instances:
        dets = []
        if rec["classes"]:
            masks = instance_masks(probs, rec["classes"], rec["boxes"], rec["labels"], cfg.threshold)
            index = {c: j for j, c in enumerate(rec["classes"])}
            for mask, lab, box in zip(masks, rec["labels"], rec["boxes"]):
                p = probs[index[int(lab)]]
                score = float(p[mask].mean()) if mask.any() else 0.0
                dets.append({"label": int(lab), "box": [round(float(v), 2) for v in box], "score": round(score, 5),
                             "segmentation": encode_rle(mask)})
        write_bytes_atomic(out_dir / "instances" / f"{rec['id']}.json", json.dumps(dets).encode())
    write_label_png(out_dir / f"{rec['id']}.png", label)


def coco_results(out_dir: Path, images: ImageSet, coco_ids: tuple[int, ...], image_id: Callable[[int], int]) -> list[dict]:
    """The per-image instance files as one COCO results list (RLE masks), in dataset order."""
    res = []
    for i in range(len(images)):
        path = out_dir / "instances" / f"{images.id(i)}.json"
        if not path.exists():
            continue
        for d in json.loads(path.read_text()):
            x0, y0, x1, y1 = d["box"]
            res.append({"image_id": image_id(i), "category_id": int(coco_ids[d["label"] - 1]),
                        "segmentation": d["segmentation"], "score": d["score"],
                        "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]})
    return res


def voc_instance_truth(images: ImageSet, coco_ids: tuple[int, ...]) -> tuple[dict, dict[int, np.ndarray]]:
    """The SegmentationObject instances of a VOC split as a COCO ground-truth dict (image_id =
    position in the split, category ids `coco_ids`), for the images that have them, and each
    such image's void mask (255: borders and unlabelled objects)."""
    from pycocotools import mask as mask_utils

    ds = images.dataset
    gt = {"images": [], "annotations": [], "categories": [{"id": int(c)} for c in coco_ids]}
    void: dict[int, np.ndarray] = {}
    for i in range(len(images)):
        truth = ds.instances(i)
        if truth is None:
            continue
        h, w = truth.void.shape
        gt["images"].append({"id": i, "height": h, "width": w})
        void[i] = truth.void
        for label, m in zip(truth.labels, truth.masks):
            rle = encode_rle(m)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "iscrowd": 0,
                                      "category_id": int(coco_ids[label - 1]), "segmentation": rle,
                                      "area": float(m.sum()), "bbox": mask_utils.toBbox(rle).tolist()})
    return gt, void


def drop_void(results: list[dict], void: dict[int, np.ndarray]) -> list[dict]:
    """Results of the images in `void` with their void pixels taken out of every mask, so that
    they count neither for nor against a detection (as 255 in mIoU); other images dropped."""
    from pycocotools import mask as mask_utils

    out = []
    for r in results:
        v = void.get(r["image_id"])
        if v is None:
            continue
        m = mask_utils.decode(r["segmentation"])
        out.append({**r, "segmentation": encode_rle(m.astype(bool) & ~v)})
    return out


def mask_ap(ground_truth: Path | dict, results: list[dict], image_ids: list[int]) -> dict:
    """COCO mask AP of `results` against the instances of `ground_truth` (a COCO instances
    file or dict), over `image_ids` (pycocotools COCOeval)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "images": len(image_ids)}
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ground_truth, dict):
            gt = COCO()
            gt.dataset = ground_truth
            gt.createIndex()
        else:
            gt = COCO(str(ground_truth))
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.imgIds = image_ids
        ev.params.catIds = sorted({r["category_id"] for r in results} | _gt_cats(gt, image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2]), "images": len(image_ids)}


def _gt_cats(gt, image_ids: list[int]) -> set[int]:
    return {a["category_id"] for a in gt.loadAnns(gt.getAnnIds(imgIds=image_ids, iscrowd=None))}
