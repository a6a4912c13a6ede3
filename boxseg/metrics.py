"""Confusion matrix and mIoU over a whole split (METHOD.md, Evaluation).

One matrix is accumulated over every pixel of the split; 255 is ignored; IoU_c is
TP / (TP + FP + FN); classes absent from both prediction and ground truth are left out of
the mean and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from boxseg.data.classes import IGNORE


@dataclass(frozen=True)
class SegScores:
    miou: float                  # mean IoU over present classes, in [0, 1]
    iou: list[float | None]      # per class; None where the class is absent from both
    pixel_acc: float
    absent: list[int]            # classes absent from both prediction and ground truth
    pixels: int                  # pixels counted (255 excluded)

    def to_dict(self, names: list[str] | tuple[str, ...] | None = None) -> dict:
        d = {"miou": self.miou, "pixel_acc": self.pixel_acc, "pixels": self.pixels,
             "absent": self.absent, "iou": self.iou}
        if names is not None:
            d["iou_by_name"] = {n: v for n, v in zip(names, self.iou)}
        return d


class ConfusionMatrix:
    """`mat[t, p]` counts pixels of true class t predicted as p (int64, num_classes^2)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.pred_ignored = 0  # truth-labelled pixels a proposal marked 255 (pred_ignore=True)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
               pred_ignore: bool = False) -> None:
        """Add a batch. `pred` and `target` are integer label maps of one shape; target 255 is
        ignored. A prediction outside 0..num_classes-1 at a counted pixel is an error, unless
        `pred_ignore` is set: then pixels a proposal marks 255 are left out too (and counted
        in `self.pred_ignored`, so coverage can be reported)."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != IGNORE
        if pred_ignore:
            dropped = keep & (pred == IGNORE)
            self.pred_ignored += int(dropped.sum())
            keep &= pred != IGNORE
        pred, target = pred[keep], target[keep]
        if target.numel() and (target.max() >= self.num_classes or target.min() < 0):
            raise ValueError(f"target holds a class outside 0..{self.num_classes - 1}")
        if pred.numel() and (pred.max() >= self.num_classes or pred.min() < 0):
            raise ValueError(f"prediction holds a class outside 0..{self.num_classes - 1}")
        n = self.num_classes
        self.mat += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.mat += other.mat
        self.pred_ignored += other.pred_ignored

    def coverage(self) -> float:
        """Fraction of truth-labelled pixels that the prediction labelled (not 255)."""
        counted = int(self.mat.sum())
        return counted / max(1, counted + self.pred_ignored)

    def scores(self) -> SegScores:
        mat = self.mat.double()
        tp = mat.diag()
        fp = mat.sum(0) - tp
        fn = mat.sum(1) - tp
        denom = tp + fp + fn
        present = denom > 0
        iou = torch.where(present, tp / denom.clamp(min=1), torch.zeros_like(tp))
        total = mat.sum()
        return SegScores(
            miou=float(iou[present].mean()) if present.any() else 0.0,
            iou=[float(v) if p else None for v, p in zip(iou.tolist(), present.tolist())],
            pixel_acc=float(tp.sum() / total) if total > 0 else 0.0,
            absent=[i for i, p in enumerate(present.tolist()) if not p],
            pixels=int(total),
        )
