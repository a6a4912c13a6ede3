"""Per-class foreground maps -> one label map (METHOD.md), and per-box instance masks."""

from __future__ import annotations

import numpy as np

from boxseg.data.boxes import box_pixel_range, union_box_mask
from boxseg.data.classes import IGNORE


def merge_foreground(probs: np.ndarray, classes: list[int], boxes: np.ndarray, labels: np.ndarray,
                     threshold: float = 0.5, margin: float = 0.1, class_margin: float = 0.1,
                     mode: str = "ignore") -> np.ndarray:
    """Merge foreground probabilities into a label map.

    Args:
        probs: float (K, H, W), SegNet2's foreground probability of classes[k] over the image.
        classes: the K class indices (each must have boxes).
        boxes, labels: (N, 4) float boxes and their (N,) classes.
        mode: "ignore" (METHOD.md): outside every box 0; inside, the covering class with the
            highest probability if it clears `threshold`, else 0; 255 where that probability
            is within `margin` of the threshold or a second covering class is within
            `class_margin` of the first while itself near or above the threshold.
            "order" (reference code): boxes painted in annotation order where their class's
            probability clears the threshold, later ones on top; no 255.
    Returns: uint8 (H, W).
    """
    k, h, w = probs.shape
    if k != len(classes):
        raise ValueError(f"{k} probability maps for {len(classes)} classes")
    out = np.zeros((h, w), np.uint8)
    if k == 0:
        return out
    if mode == "order":
        index = {c: j for j, c in enumerate(classes)}
        for box, lab in zip(boxes, labels):
            r0, r1, c0, c1 = box_pixel_range(box, h, w)
            region = probs[index[int(lab)], r0:r1, c0:c1] >= threshold
            out[r0:r1, c0:c1][region] = lab
        return out
    if mode != "ignore":
        raise ValueError(f"merge mode must be 'ignore' or 'order', not {mode!r}")
    inside = np.stack([union_box_mask(boxes[labels == c], h, w) for c in classes])
    p = np.where(inside, probs, -1.0)
    order = np.argsort(-p, axis=0, kind="stable")
    best = order[0]
    p1 = np.take_along_axis(p, best[None], 0)[0]
    p2 = np.take_along_axis(p, order[1][None], 0)[0] if k > 1 else np.full((h, w), -1.0)
    any_inside = inside.any(0)
    cls = np.asarray(classes, np.uint8)[best]
    out = np.where(any_inside & (p1 >= threshold), cls, 0).astype(np.uint8)
    uncertain = np.abs(p1 - threshold) < margin
    close = (p2 >= threshold - margin) & (p1 - p2 < class_margin)
    out[any_inside & (uncertain | close)] = IGNORE
    return out


def instance_masks(probs: np.ndarray, classes: list[int], boxes: np.ndarray, labels: np.ndarray,
                   threshold: float = 0.5) -> list[np.ndarray]:
    """One bool (H, W) mask per box: its class's foreground inside the box."""
    k, h, w = probs.shape
    index = {c: j for j, c in enumerate(classes)}
    masks = []
    for box, lab in zip(boxes, labels):
        m = np.zeros((h, w), bool)
        r0, r1, c0, c1 = box_pixel_range(box, h, w)
        m[r0:r1, c0:c1] = probs[index[int(lab)], r0:r1, c0:c1] >= threshold
        masks.append(m)
    return masks
