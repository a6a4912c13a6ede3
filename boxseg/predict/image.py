"""The one preprocessing and the one postprocessing of every Predictor's consumer.

Images travel as uint8 and are normalised on the device (`normalize`), so a DataLoader
moves 4x fewer bytes. An image of (h, w) is scaled by `Letterbox.scale` and placed at the
top-left of a size x size canvas (`letterbox`); the network's maps on that canvas are
mapped back to the image exactly (`unletterbox`) and turned into probabilities there
(`probabilities`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from boxseg.data.transforms import MEAN, STD, resize


@functools.cache
def normalize_table() -> np.ndarray:
    """`normalize` of every uint8 value of each channel: float32 (1, 256, 3), a lookup table
    for cv2.LUT on (H, W, 3) RGB images (the same values: normalize is elementwise)."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, 3).contiguous()
    return normalize(values)[0].permute(1, 2, 0).contiguous().numpy()


def normalize(images_u8: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (B, 3, H, W) -> float32 (B, 3, H, W), ImageNet-normalised;
    written into `out` (float32 (B, 3, H, W), a view is fine) when given, without allocating."""
    x = images_u8
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() if out is None else out.copy_(x)
    x.div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def segnet2_inputs(images_u8: torch.Tensor, box: torch.Tensor | None, cls: torch.Tensor, segnet1,
                   image_index: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """SegNet2's (P, 4|5, S, S) float32 input, built on the device: normalised image, box
    mask, and with `segnet1` the score map S_m (its softmax probability of class cls[p]).

    images_u8: (B, S, S, 3); box: (P, S, S) bool or float, or None when the caller has
    written channel 3 of `out` itself; cls: (P,). Pair p uses image `image_index[p]`
    (default: image p), so SegNet1 runs once per image even when several pairs share it.
    `out`: a float32 (P, 4|5, S, S) buffer to fill (a batch's inputs without allocating);
    the values are the same either way.
    """
    if out is None:
        hw = images_u8.shape[1:3] if images_u8.shape[-1] == 3 and images_u8.shape[1] != 3 else images_u8.shape[2:]
        out = torch.empty((len(cls), 4 + (segnet1 is not None), *hw), dtype=torch.float32, device=images_u8.device)
    # index_select, not x[index]: the same rows, on CPU 5x faster (0.16 against 0.84 ms at b64 @128)
    if segnet1 is None:  # normalise the pairs' images straight into the buffer
        normalize(images_u8 if image_index is None else images_u8.index_select(0, image_index), out=out[:, :3])
    else:
        x = normalize(images_u8)
        out[:, :3] = x if image_index is None else x.index_select(0, image_index)
        with torch.no_grad():
            logits = segnet1(x)
            probs = torch.nn.functional.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear",
                                                    align_corners=False).softmax(1)
            if image_index is not None:
                probs = probs.index_select(0, image_index)
            out[:, 4:5] = probs.gather(1, cls.long().view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:]))
    if box is not None:
        out[:, 3].copy_(box)
    return out


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


def letterbox_tensor(image: torch.Tensor, lb: Letterbox, pad: np.ndarray) -> torch.Tensor:
    """`letterbox` of a uint8 (3, H, W) image tensor on any device (a GPU decoder's output)
    -> uint8 (size, size, 3) there. Bilinear as OpenCV's INTER_LINEAR (half-pixel centres, no
    antialiasing) but in float32 and rounded, where OpenCV weighs uint8 pixels in 11-bit
    fixed point: within 1 of `letterbox` per value (tested)."""
    ih, iw = lb.inner
    x = image
    if (ih, iw) != tuple(image.shape[1:]):
        x = torch.nn.functional.interpolate(image[None].float(), size=(ih, iw), mode="bilinear",
                                            align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
    out = torch.empty((lb.size, lb.size, 3), dtype=torch.uint8, device=image.device)
    out[:] = torch.as_tensor(np.asarray(pad, np.uint8), device=image.device)
    out[:ih, :iw] = x.permute(1, 2, 0)
    return out


class TorchvisionMissing(RuntimeError):
    """Decoding JPEGs on the device needs torchvision (torchvision.io.decode_jpeg)."""


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG files' bytes -> uint8 RGB (3, H, W) tensors on `device`, by torchvision.io.decode_jpeg
    (nvJPEG on CUDA, libjpeg-turbo on CPU), all in one call; None for a file it cannot decode
    (then decoded one by one to find which)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:
        raise TorchvisionMissing(f"decoding JPEGs on the device needs torchvision ({e}); install the "
                                 f"torchvision built for this torch, or decode on the CPU (the default)") from None
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if not tensors:
        return []
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole call
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
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
