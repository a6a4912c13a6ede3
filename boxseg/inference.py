"""SegNet1 inference through a Predictor (probabilities, mIoU), baseline label folders, and
scoring a label folder against ground truth (SegNet2 proposals: boxseg.propose)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from boxseg.data.classes import IGNORE
from boxseg.data.files import read_label, write_label_png
from boxseg.data.images import ImageSet
from boxseg.data.transforms import MEAN_U8
from boxseg.errors import NonFiniteOutput
from boxseg.metrics import ConfusionMatrix, SegScores
from boxseg.predict import Predictor, as_predictor
from boxseg.predict.base import default_streams
from boxseg.predict.image import letterbox, letterbox_params, normalize, normalize_table, probabilities
from boxseg.workers import default_helpers, in_threads

if TYPE_CHECKING:
    from boxseg.crf import CRFParams


def _views(images: list[np.ndarray], test_size: int, scales: tuple[float, ...], flip: bool,
           normalized: bool = False) -> list[tuple]:
    """The images' test views, scales outer and mirrored inner, each as (canvases, letterboxes,
    mirrored): the images letterboxed into one (B, S, S, 3) array, uint8, or with
    `normalized` float32 already normalised (`normalize_table`, the same values: for a
    channels-last Predictor on CPU, which takes its permuted view without a copy)."""
    from boxseg.data.transforms import resize

    views = []
    for s in scales:
        scaled = [im if s == 1.0 else resize(im, max(1, round(im.shape[0] * s)), max(1, round(im.shape[1] * s)), False)
                  for im in images]
        for mirrored in ((False, True) if flip else (False,)):
            vs = [np.ascontiguousarray(v[:, ::-1]) if mirrored else v for v in scaled]
            lbs = [letterbox_params(*v.shape[:2], test_size, upscale=False) for v in vs]
            canvases = np.stack([letterbox(v, lb, MEAN_U8) for v, lb in zip(vs, lbs)])
            if normalized:
                table, u8 = normalize_table(), canvases
                canvases = np.empty(u8.shape, np.float32)
                for k in range(len(u8)):
                    cv2.LUT(u8[k], table, dst=canvases[k])
            views.append((canvases, lbs, mirrored))
    return views


def _probs_of_views(model: Predictor, views: list[tuple], sizes: list[tuple[int, int]],
                    device: torch.device) -> list[torch.Tensor]:
    """Softmax (C, h, w) per image, on the device, averaged over its views (`_views`; their
    canvases arrays, or tensors, pinned ones uploaded without waiting): each view of all the
    images in one batch through the model."""
    sums: list[torch.Tensor | None] = [None] * len(sizes)
    for canvases, lbs, mirrored in views:
        x = canvases if isinstance(canvases, torch.Tensor) else torch.from_numpy(canvases)
        if x.dtype == torch.uint8:
            x = normalize(x.to(device, non_blocking=x.is_pinned()))
        else:  # normalised already (on CPU): (B, S, S, 3) is the channels-last (B, 3, S, S)
            x = x.permute(0, 3, 1, 2)
        logits = model(x)
        for k, lb in enumerate(lbs):
            p = probabilities(logits[k], lb)
            if mirrored:
                p = p.flip(-1)
            if p.shape[-2:] != sizes[k]:
                p = torch.nn.functional.interpolate(p[None], size=sizes[k], mode="bilinear", align_corners=False)[0]
            sums[k] = p if sums[k] is None else sums[k] + p
    return [t / len(views) for t in sums]


def _normalize_on_host(model: Predictor, device: torch.device) -> bool:
    """Whether the views are normalised where they are built: on CPU, for a Predictor that
    takes channels-last input (a uint8 batch normalised by torch there took four passes)."""
    return device.type == "cpu" and getattr(model, "memory_format", None) == torch.channels_last


@torch.no_grad()
def segnet1_probs(model: Predictor, images: list[np.ndarray], test_size: int, device: torch.device,
                  scales: tuple[float, ...] = (1.0,), flip: bool = False) -> list[torch.Tensor]:
    """Softmax (C, h, w) per image (float32, on the device) from a Predictor. Each image
    (scaled by each of `scales`, and mirrored with `flip`) is padded to test_size (scaled down
    only if larger); the probabilities are mapped back to the image and averaged."""
    model = as_predictor(model, "segnet1", test_size, device)
    views = _views(images, test_size, scales, flip, _normalize_on_host(model, device))
    return _probs_of_views(model, views, [im.shape[:2] for im in images], device)


def evaluate_segnet1(model: Predictor, images: ImageSet, test_size: int, device: torch.device, batch: int = 16,
                     scales: tuple[float, ...] = (1.0,), flip: bool = False, progress: bool = False,
                     conf: ConfusionMatrix | None = None, crf: "CRFParams | None" = None,
                     save_dir: Path | None = None, workers: int | None = None) -> SegScores:
    """mIoU of SegNet1 (a Predictor) over a split with ground truth; with `crf`, each image's
    probabilities are refined by boxseg.crf.dense_crf first. With `save_dir`, each image's
    predicted labels (after the CRF) are written there as `ID.png` in the VOC palette, the
    format of the ground truth, so any scorer can check the mIoU.

    A pipeline, as boxseg-propose's: `workers` threads (default `default_helpers`) decode
    each batch's images and ground truth and build their views ahead of the model; the
    model, the probabilities, the labels (the first of equal maxima, as argmax) and the
    confusion counts stay on the device, with no wait for it an image (on CUDA the host
    queues batch n+1 while the device works on batch n); each batch's ground truth goes up
    in one copy, and with `save_dir` its labels come down in one copy, written by a thread.
    On CPU two batches are in flight (without `crf`, where the backend allows: eager torch,
    onnxruntime), each in a thread on half the threads with its own counts, as
    boxseg-propose's model streams. The same counts and labels as image by image
    (tests/test_eval.py)."""
    from tqdm import tqdm

    from boxseg.crf import dense_crf

    model = as_predictor(model, "segnet1", test_size, device, batch=batch)
    conf = conf if conf is not None else ConfusionMatrix(images.num_classes)
    n = images.num_classes
    cuda = device.type == "cuda"
    flags: list[tuple[list[str], torch.Tensor]] = []  # each batch's ids and finite flags, read at the end
    writes = ThreadPoolExecutor(1, thread_name_prefix="boxseg-write") if save_dir is not None else None
    pending: deque = deque()

    on_host = _normalize_on_host(model, device)

    def decode(ks: range) -> dict:
        """In a decoder thread: a batch's ids, image sizes, ground truth (padded with 255 to
        the largest) and views; on CUDA in pinned memory, for uploads that do not wait."""
        items = [images[i] for i in ks]
        for item in items:
            if item.mask is None:
                raise ValueError(f"{item.id}: no ground-truth mask")
        sizes = [it.mask.shape for it in items]
        truth = np.full((len(items), max(h for h, _ in sizes), max(w for _, w in sizes)), IGNORE, np.uint8)
        for k, it in enumerate(items):
            truth[k, : sizes[k][0], : sizes[k][1]] = it.mask
        views = _views([it.image for it in items], test_size, scales, flip, on_host)
        if cuda:
            truth = torch.from_numpy(truth).pin_memory()
            views = [(torch.from_numpy(c).pin_memory(), lbs, mirrored) for c, lbs, mirrored in views]
        return {"ids": [it.id for it in items], "sizes": sizes, "truth": torch.as_tensor(truth), "views": views,
                "images": [it.image for it in items] if crf is not None else None}

    streams = default_streams(device, model) if crf is None else 1  # (the CRF: one image at a time)
    models = model.for_streams(streams) if streams > 1 else [model]
    counts = [torch.zeros(n * n + 1, dtype=torch.int64, device=device) for _ in models]  # the last bin: not counted

    def run(chunk: dict, slot: int) -> tuple:
        """A batch through the model and into the counts of its stream; its labels and flags."""
        ids, sizes = chunk["ids"], chunk["sizes"]
        truth = chunk["truth"].to(device, non_blocking=cuda)
        labels = torch.zeros(truth.shape, dtype=torch.uint8, device=device)
        finite = torch.zeros(len(ids), dtype=torch.bool, device=device)
        with torch.no_grad():
            probs = _probs_of_views(models[slot], chunk["views"], sizes, device)
            for k, p in enumerate(probs):
                best, pred = p.max(0)  # argmax's indices (the first of equal maxima) at a seventh of its time on CPU
                # a pixel's probabilities are all finite or all NaN (a softmax, or a mean of softmaxes),
                # and the max propagates NaN: the maxima are finite exactly when every probability is
                ok = torch.isfinite(best).all()
                if crf is not None and ok:  # (a wait an image: the CRF's own cost is far larger)
                    pred = dense_crf(p, torch.from_numpy(chunk["images"][k]).to(device), crf).max(0).indices
                finite[k] = ok
                h, w = sizes[k]
                t = truth[k, :h, :w].long()
                # counted: labelled truth of a finite image (argmax of NaN would be a silent wrong answer)
                _add(counts[slot], torch.where((t != IGNORE) & ok, t * n + pred, n * n).flatten())
                labels[k, :h, :w] = pred
        return ids, sizes, labels, finite

    def done(ids, sizes, labels, finite) -> None:
        flags.append((ids, finite))
        if writes is not None:
            while len(pending) >= 2:  # batches waiting for the writer: bounded
                pending.popleft().result()
            pending.append(writes.submit(_write_labels, save_dir, ids, sizes, *_download(labels, finite, cuda)))

    main_threads = torch.get_num_threads()
    pool = (ThreadPoolExecutor(streams, thread_name_prefix="boxseg-model", initializer=torch.set_num_threads,
                               initargs=(max(1, main_threads // streams),)) if streams > 1 else None)
    inflight: deque = deque()
    # (at the lowest priority only where each stream has threads to spare, as propose's decoders)
    chunks = in_threads(decode, len(images), batch, default_helpers(cuda) if workers is None else workers,
                        background=main_threads // streams > 1)
    try:
        for seq, chunk in enumerate(tqdm(chunks, total=-(-len(images) // batch), desc="eval", disable=not progress,
                                         leave=False)):
            if pool is None:
                done(*run(chunk, 0))
                continue
            if len(inflight) >= streams:
                done(*inflight.popleft().result())
            inflight.append(pool.submit(run, chunk, seq % streams))
        while inflight:
            done(*inflight.popleft().result())
        while pending:
            pending.popleft().result()
    finally:
        chunks.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(main_threads)  # the streams set torch's default for new threads
        if writes is not None:
            writes.shutdown(wait=True, cancel_futures=True)
    counts = sum(counts[1:], counts[0])
    conf.mat += counts[: n * n].cpu().view(n, n)
    bad = [i for ids, f in flags for i, ok in zip(ids, f.tolist()) if not ok]
    if bad:
        raise NonFiniteOutput(bad, getattr(model, "precision", "fp32"))
    return conf.scores()


def _add(counts: torch.Tensor, index: torch.Tensor) -> None:
    """counts[index] += 1 for each element (a histogram): bincount on CPU; on CUDA scatter_add_,
    which, unlike bincount (it reads the input's max back), does not wait for the device."""
    if counts.is_cuda:
        counts.scatter_add_(0, index, torch.ones_like(index))
    else:
        counts += torch.bincount(index, minlength=len(counts))


def _download(labels: torch.Tensor, finite: torch.Tensor, cuda: bool) -> tuple:
    """A batch's labels and finite flags to the host: on CUDA into pinned memory without
    waiting, with an event the writer waits on."""
    if not cuda:
        return labels, finite, None
    host = (labels.to("cpu", non_blocking=True), finite.to("cpu", non_blocking=True))
    done = torch.cuda.Event()
    done.record()
    return (*host, done)


def _write_labels(save_dir: Path, ids: list[str], sizes: list[tuple[int, int]], labels: torch.Tensor,
                  finite: torch.Tensor, done) -> None:
    """Writer thread: each finite image's labels as ID.png (VOC palette), atomically."""
    if done is not None:
        done.synchronize()
    for sample_id, (h, w), lab, ok in zip(ids, sizes, labels.numpy(), finite.tolist()):
        if ok:
            write_label_png(save_dir / f"{sample_id}.png", lab[:h, :w])


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

