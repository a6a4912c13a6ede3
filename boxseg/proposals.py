"""Per-class foreground maps -> one label map (METHOD.md), and per-box instance masks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from boxseg.data.boxes import box_pixel_range, union_box_mask
from boxseg.data.classes import IGNORE

if TYPE_CHECKING:
    import torch


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


def merge_foreground_fast(probs: np.ndarray, classes: list[int], inside: np.ndarray, threshold: float = 0.5,
                          margin: float = 0.1, class_margin: float = 0.1) -> np.ndarray:
    """`merge_foreground`'s "ignore" rule for one image in a few numpy operations a class (no
    sort): probs float32 (K, H, W), inside bool (K, H, W) the union of classes[k]'s boxes.
    Elementwise the arithmetic of `merge_foreground_batch`, so the same bytes (tested against
    the reference); boxseg.propose uses it on CPU, where it costs microseconds an image."""
    k, h, w = probs.shape
    if k == 0:
        return np.zeros((h, w), np.uint8)
    minus1 = np.float32(-1.0)
    if k == 1 and not minus1 >= threshold - margin:  # one class (most images): no runner-up
        fg, box = probs[0], inside[0]   # where outside the boxes, masked below
        out = np.where(box & (fg >= threshold), np.uint8(classes[0]), np.uint8(0))
        out[box & (np.abs(fg - threshold) < margin)] = IGNORE
        return out
    p1 = np.where(inside[0], probs[0], minus1)
    p2 = np.full((h, w), minus1, probs.dtype)
    cls = np.full((h, w), classes[0], np.uint8)
    for j in range(1, k):
        pj = np.where(inside[j], probs[j], minus1)
        above = pj > p1
        p2 = np.where(above, p1, np.maximum(p2, pj))
        p1 = np.where(above, pj, p1)
        cls[above] = classes[j]
    any_inside = inside.any(0)
    out = np.where(any_inside & (p1 >= threshold), cls, np.uint8(0))
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


# -- the same rules on the device (boxseg.propose): byte-identical to the numpy ones above ----

def range_masks(ranges: list, height: int, width: int, device) -> torch.Tensor:
    """bool (P, H, W): 1 inside any of each entry's pixel ranges (an int array (k, 4) of r0,
    r1, c0, c1 as `box_pixel_range` gives), built on the device."""
    import torch

    kmax = max([1] + [len(r) for r in ranges])
    padded = np.zeros((len(ranges), kmax, 4), np.int64)  # empty range (0, 0, 0, 0) for padding
    for p, r in enumerate(ranges):
        if len(r):
            padded[p, : len(r)] = r
    t = torch.from_numpy(padded).to(device, non_blocking=True)
    yy = torch.arange(height, device=device).view(1, 1, height, 1)
    xx = torch.arange(width, device=device).view(1, 1, 1, width)
    r0, r1, c0, c1 = (t[..., j].view(len(ranges), kmax, 1, 1) for j in range(4))
    return ((yy >= r0) & (yy < r1) & (xx >= c0) & (xx < c1)).any(1)


def fill_ranges(out: np.ndarray, ranges: list, value=1, clear: bool = True) -> np.ndarray:
    """`range_masks` in numpy, painted into `out` (P, H, W) in place: 0 outside, `value`
    inside any of entry p's pixel ranges (an int array (k, 4) of r0, r1, c0, c1). On CPU a
    box costs a slice assignment, microseconds. `clear=False`: `out` is already 0 outside."""
    if clear:
        out.fill(0)
    for p, rs in enumerate(ranges):
        for r0, r1, c0, c1 in np.asarray(rs).reshape(-1, 4).tolist():
            out[p, r0:r1, c0:c1] = value
    return out


def merge_foreground_torch(probs: torch.Tensor, classes: list[int], inside: torch.Tensor,
                           box_ranges: np.ndarray, labels: np.ndarray, threshold: float = 0.5,
                           margin: float = 0.1, class_margin: float = 0.1, mode: str = "ignore") -> torch.Tensor:
    """`merge_foreground` on the device. probs float32 (K, H, W); inside bool (K, H, W), the
    union of classes[k]'s boxes (`range_masks`); box_ranges int (N, 4) the boxes' pixel
    ranges and labels (N,) their classes (for mode "order"). Returns uint8 (H, W)."""
    import torch

    k, h, w = probs.shape
    out = torch.zeros((h, w), dtype=torch.uint8, device=probs.device)
    if k == 0:
        return out
    if mode == "order":
        index = {c: j for j, c in enumerate(classes)}
        for (r0, r1, c0, c1), lab in zip(box_ranges.tolist(), labels.tolist()):
            region = out[r0:r1, c0:c1]
            region[probs[index[int(lab)], r0:r1, c0:c1] >= threshold] = int(lab)
        return out
    if mode != "ignore":
        raise ValueError(f"merge mode must be 'ignore' or 'order', not {mode!r}")
    cls = torch.tensor(classes, dtype=torch.uint8).to(probs.device, non_blocking=True)
    return merge_foreground_batch(probs[None], cls[None], inside[None], threshold, margin, class_margin)[0]


def merge_foreground_batch(probs: torch.Tensor, classes: torch.Tensor, inside: torch.Tensor, threshold: float = 0.5,
                           margin: float = 0.1, class_margin: float = 0.1) -> torch.Tensor:
    """The "ignore" merge rule for N images at once, a fixed number of kernels whatever N:
    probs float32 (N, K, H, W), classes uint8 (N, K), inside bool (N, K, H, W). Images with
    fewer classes or smaller than (H, W) are padded: a slot (or pixel) inside none of the
    boxes takes no part, and padding pixels come out 0. Returns uint8 (N, H, W),
    elementwise the same arithmetic as `merge_foreground_torch` image by image."""
    import torch

    n, k, h, w = probs.shape
    if k == 0:
        return torch.zeros((n, h, w), dtype=torch.uint8, device=probs.device)
    minus1 = torch.full((), -1.0, dtype=probs.dtype, device=probs.device)
    # the best and second-best probability over the few classes (K is small), one class at a
    # time: a reduction over the class dim (argmax, topk) is many times slower on CPU. A
    # strict `>` keeps the first of equal maxima, as numpy's stable argsort; p2 equals p1 on a tie.
    p1 = torch.where(inside[:, 0], probs[:, 0], minus1)
    p2 = torch.full((n, h, w), -1.0, dtype=probs.dtype, device=probs.device)
    cls = classes[:, 0].view(n, 1, 1).expand(n, h, w)
    for j in range(1, k):
        pj = torch.where(inside[:, j], probs[:, j], minus1)
        above = pj > p1
        p2 = torch.where(above, p1, torch.maximum(p2, pj))
        p1 = torch.where(above, pj, p1)
        cls = torch.where(above, classes[:, j].view(n, 1, 1), cls)
    any_inside = inside.any(1)
    out = torch.where(any_inside & (p1 >= threshold), cls, torch.zeros((), dtype=torch.uint8, device=probs.device))
    uncertain = (p1 - threshold).abs() < margin
    close = (p2 >= threshold - margin) & (p1 - p2 < class_margin)
    return out.masked_fill_(any_inside & (uncertain | close), IGNORE)
