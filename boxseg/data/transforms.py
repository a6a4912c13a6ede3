"""Training augmentations and the image constants (the inference letterbox and the
normalisation live in boxseg.predict.image, defined once for every consumer)."""

from __future__ import annotations

import cv2
import numpy as np

from boxseg.data.classes import IGNORE

MEAN = (0.485, 0.456, 0.406)  # torchvision ImageNet normalisation (VGG16 weights expect it)
STD = (0.229, 0.224, 0.225)
MEAN_U8 = np.array([round(255 * m) for m in MEAN], np.uint8)  # pads that normalise to 0


def resize(arr: np.ndarray, h: int, w: int, nearest: bool) -> np.ndarray:
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    out = cv2.resize(arr, (w, h), interpolation=interp)
    return out if out.ndim == arr.ndim else out[..., None]


def random_scale_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, crop: int,
                      scale_min: float, scale_max: float) -> tuple[np.ndarray, np.ndarray]:
    """SegNet1 augmentation: random scale, pad (image 0 -> mean after normalisation is not
    needed: the pad is ignored by the label), random crop, random horizontal flip."""
    s = rng.uniform(scale_min, scale_max)
    h, w = label.shape
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    image, label = resize(image, nh, nw, False), resize(label, nh, nw, True)
    ph, pw = max(crop, nh), max(crop, nw)
    img_p = np.empty((ph, pw, 3), np.uint8)
    img_p[:] = MEAN_U8
    lab_p = np.full((ph, pw), IGNORE, np.uint8)
    img_p[:nh, :nw], lab_p[:nh, :nw] = image, label
    y0, x0 = int(rng.integers(0, ph - crop + 1)), int(rng.integers(0, pw - crop + 1))
    img_c, lab_c = img_p[y0:y0 + crop, x0:x0 + crop], lab_p[y0:y0 + crop, x0:x0 + crop]
    if rng.uniform() < 0.5:
        img_c, lab_c = img_c[:, ::-1], lab_c[:, ::-1]
    return np.ascontiguousarray(img_c), np.ascontiguousarray(lab_c)


def crop_around_boxes(rng: np.random.Generator, image: np.ndarray, box_mask: np.ndarray, target: np.ndarray,
                      score: np.ndarray | None, boxes: np.ndarray, size: int, scale_min: float, scale_max: float):
    """SegNet2 augmentation: letterbox scale x a random factor, then a size x size crop that
    holds the centre of the class's boxes (at a random offset), and a random flip."""
    h, w = target.shape
    s = size / max(h, w) * rng.uniform(scale_min, scale_max)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    image, box_mask, target = resize(image, nh, nw, False), resize(box_mask, nh, nw, True), resize(target, nh, nw, True)
    score = resize(score, nh, nw, False) if score is not None else None
    x0b, y0b = boxes[:, 0].min() * s, boxes[:, 1].min() * s
    x1b, y1b = boxes[:, 2].max() * s, boxes[:, 3].max() * s
    cx, cy = (x0b + x1b) / 2, (y0b + y1b) / 2
    ox = int(round(cx - size / 2 + rng.uniform(-0.25, 0.25) * size))
    oy = int(round(cy - size / 2 + rng.uniform(-0.25, 0.25) * size))

    def cut(arr, pad):
        out = np.full((size, size) + arr.shape[2:], pad, arr.dtype)
        sy0, sx0 = max(0, oy), max(0, ox)
        sy1, sx1 = min(nh, oy + size), min(nw, ox + size)
        if sy1 > sy0 and sx1 > sx0:
            out[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox] = arr[sy0:sy1, sx0:sx1]
        return out

    img_c = cut(image, MEAN_U8)
    out = [img_c, cut(box_mask, 0), cut(target, IGNORE), cut(score, 0) if score is not None else None]
    if rng.uniform() < 0.5:
        out = [a[:, ::-1] if a is not None else None for a in out]
    return [np.ascontiguousarray(a) if a is not None else None for a in out]
