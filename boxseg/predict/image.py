"""The one preprocessing and the one postprocessing of every Predictor's consumer.

Images travel as uint8 and are normalised on the device (`normalize`), so a DataLoader
moves 4x fewer bytes. An image of (h, w) is scaled by `Letterbox.scale` and placed at the
top-left of a size x size canvas (`letterbox`); the network's maps on that canvas are
mapped back to the image exactly (`unletterbox`) and turned into probabilities there
(`probabilities`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from boxseg.data.transforms import MEAN, STD, resize


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> float32 (B, 3, H, W), ImageNet-normalised."""
    x = images_u8
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class Letterbox:
    """An image of (h, w) scaled by `scale` and placed at the top-left of a size x size canvas."""
    h: int
    w: int
    size: int
    scale: float

    @property
    def inner(self) -> tuple[int, int]:
        """(rows, cols) of the canvas the image occupies."""
        return max(1, round(self.h * self.scale)), max(1, round(self.w * self.scale))


def letterbox_params(h: int, w: int, size: int, upscale: bool = True) -> Letterbox:
    scale = size / max(h, w)
    return Letterbox(h, w, size, scale if upscale else min(1.0, scale))


def letterbox(arr: np.ndarray, lb: Letterbox, pad: float | np.ndarray, nearest: bool = False) -> np.ndarray:
    """Scale `arr` (H, W[, C]) by lb.scale and pad to lb.size x lb.size at the bottom/right
    with `pad` (a scalar, or one value per channel such as MEAN_U8)."""
    ih, iw = lb.inner
    inner = arr if (ih, iw) == arr.shape[:2] else resize(arr, ih, iw, nearest)
    out = np.empty((lb.size, lb.size) + arr.shape[2:], dtype=arr.dtype)
    out[:ih, :iw] = inner.reshape((ih, iw) + arr.shape[2:])
    pad = np.asarray(pad, dtype=arr.dtype)  # filling only the margins: np.full with per-channel values is slow
    out[ih:] = pad
    out[:ih, iw:] = pad
    return out


def unletterbox(maps: torch.Tensor, lb: Letterbox) -> torch.Tensor:
    """(C, S', S') maps on the canvas (any stride) -> float32 (C, h, w) on the image, bilinear."""
    stride = lb.size / maps.shape[-1]
    ih, iw = lb.inner
    crop = maps[:, : math.ceil(ih / stride), : math.ceil(iw / stride)]
    # upsample to canvas resolution of the crop (at stride 1 an identity: skipped), cut the
    # exact inner region, then resize to the image
    if stride == 1:
        up = crop.float()
    else:
        up = torch.nn.functional.interpolate(crop[None].float(), scale_factor=stride, mode="bilinear",
                                             align_corners=False)[0]
    up = up[:, :ih, :iw]
    if (ih, iw) != (lb.h, lb.w):
        up = torch.nn.functional.interpolate(up[None], size=(lb.h, lb.w), mode="bilinear", align_corners=False)[0]
    return up


def probabilities(logits: torch.Tensor, lb: Letterbox) -> torch.Tensor:
    """One image's logits (K, S', S') on the canvas -> softmax probabilities float32 (K, h, w)."""
    return unletterbox(logits, lb).softmax(0)
