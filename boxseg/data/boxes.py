"""Boxes as pixel masks, and the box-filled labelling."""

from __future__ import annotations

import math

import numpy as np


def box_pixel_range(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel rows/cols covered by a float box x0,y0,x1,y1 (0-based, exclusive end): every pixel
    the box touches. Returns r0, r1, c0, c1 clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, c1 = max(0, math.floor(x0)), min(width, math.ceil(x1))
    r0, r1 = max(0, math.floor(y0)), min(height, math.ceil(y1))
    return r0, r1, c0, c1


def union_box_mask(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool (H, W): 1 inside any of `boxes` (N, 4)."""
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        r0, r1, c0, c1 = box_pixel_range(box, height, width)
        mask[r0:r1, c0:c1] = True
    return mask


def fill_boxes(boxes: np.ndarray, labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The box baseline: uint8 (H, W), each box filled with its class, smaller boxes on top."""
    out = np.zeros((height, width), dtype=np.uint8)
    if len(boxes) == 0:
        return out
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in np.argsort(-areas, kind="stable"):  # largest first, so smaller ones paint last
        r0, r1, c0, c1 = box_pixel_range(boxes[i], height, width)
        out[r0:r1, c0:c1] = labels[i]
    return out
