"""The baselines of METHOD.md: box-filled, SDI-style box-centre with ignore, GrabCut."""

from __future__ import annotations

import cv2
import numpy as np

from boxseg.data.boxes import box_pixel_range, fill_boxes
from boxseg.data.classes import IGNORE

BASELINES = ("box", "box-centre", "grabcut")


def box_centre(boxes: np.ndarray, labels: np.ndarray, h: int, w: int, fraction: float = 0.5) -> np.ndarray:
    """Each box is 255 except its centre (`fraction` of each side), which is its class;
    smaller boxes on top."""
    out = np.zeros((h, w), np.uint8)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-areas, kind="stable")
    for i in order:
        r0, r1, c0, c1 = box_pixel_range(boxes[i], h, w)
        out[r0:r1, c0:c1] = IGNORE
    for i in order:
        x0, y0, x1, y1 = boxes[i]
        dx, dy = (x1 - x0) * (1 - fraction) / 2, (y1 - y0) * (1 - fraction) / 2
        r0, r1, c0, c1 = box_pixel_range(np.array([x0 + dx, y0 + dy, x1 - dx, y1 - dy]), h, w)
        out[r0:r1, c0:c1] = labels[i]
    return out


def grabcut(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, iterations: int = 5) -> np.ndarray:
    """OpenCV GrabCut initialised with each box (largest first, smaller on top). A box too
    small for GrabCut (< 4 px a side), or covering the whole image (no background left to
    model), is filled."""
    h, w = image.shape[:2]
    out = np.zeros((h, w), np.uint8)
    bgr = np.ascontiguousarray(image[..., ::-1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in np.argsort(-areas, kind="stable"):
        r0, r1, c0, c1 = box_pixel_range(boxes[i], h, w)
        if r1 - r0 < 4 or c1 - c0 < 4 or (r1 - r0 >= h - 1 and c1 - c0 >= w - 1):
            out[r0:r1, c0:c1] = labels[i]
            continue
        mask = np.zeros((h, w), np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's GMM init is random; fixed for reproducible proposals
        cv2.grabCut(bgr, mask, (c0, r0, c1 - c0, r1 - r0), bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
        fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        out[fg] = labels[i]
    return out


def baseline_labels(name: str, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                    centre_fraction: float = 0.5) -> np.ndarray:
    h, w = image.shape[:2]
    if name == "box":
        return fill_boxes(boxes, labels, h, w)
    if name == "box-centre":
        return box_centre(boxes, labels, h, w, centre_fraction)
    if name == "grabcut":
        return grabcut(image, boxes, labels)
    raise KeyError(f"unknown baseline {name!r}; valid: {list(BASELINES)}")
