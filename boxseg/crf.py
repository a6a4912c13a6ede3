"""A dense CRF for SegNet1's output, in the local-window form of ConvCRF (Teichmann &
Cipolla, 2018): the fully connected model of Krähenbühl & Koltun with DeepLab's Gaussian
kernels, truncated to a window x window neighbourhood so that mean-field inference is a
few vectorised tensor operations per offset, on any device, with no compiled extension.

    E(x) = sum_i -log P_i(x_i) + sum_{i, j in window(i)} [x_i != x_j] k(i, j)
    k(i, j) = w_bi exp(-|p_i - p_j|^2 / 2 s_xy^2 - |I_i - I_j|^2 / 2 s_rgb^2)
            + w_pos exp(-|p_i - p_j|^2 / 2 s_pos^2)

With the Potts compatibility the mean-field update is Q <- softmax(log P + sum_j k(i,j) Q_j).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CRFParams:
    """DeepLab-v1's CRF settings (bi_w 4, bi_xy_std 121, bi_rgb_std 5, pos_w 3, pos_xy_std 3,
    10 iterations), with the kernels cut to a `window` x `window` neighbourhood."""
    iterations: int = 10
    window: int = 11
    bi_w: float = 4.0
    bi_xy_std: float = 121.0
    bi_rgb_std: float = 5.0
    pos_w: float = 3.0
    pos_xy_std: float = 3.0


def _kernel_weights(image: torch.Tensor, p: CRFParams) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Offsets (dy, dx) of the window (centre left out) and their (K, H, W) weights k(i, i + offset);
    zero where the neighbour lies outside the image."""
    r = p.window // 2
    h, w = image.shape[1:]
    img = torch.nn.functional.pad(image, (r, r, r, r))
    inside = torch.nn.functional.pad(torch.ones(1, h, w, device=image.device), (r, r, r, r))
    offsets, weights = [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy == 0 and dx == 0:
                continue
            d2 = float(dy * dy + dx * dx)
            nb = img[:, r + dy:r + dy + h, r + dx:r + dx + w]
            colour = ((image - nb) ** 2).sum(0)
            k = (p.bi_w * torch.exp(-d2 / (2 * p.bi_xy_std ** 2) - colour / (2 * p.bi_rgb_std ** 2))
                 + p.pos_w * math.exp(-d2 / (2 * p.pos_xy_std ** 2)))
            offsets.append((dy, dx))
            weights.append(k * inside[0, r + dy:r + dy + h, r + dx:r + dx + w])
    return offsets, torch.stack(weights)


def dense_crf(probs: torch.Tensor, image: torch.Tensor, params: CRFParams = CRFParams()) -> torch.Tensor:
    """Refine class probabilities with mean-field inference.

    probs: float (C, H, W), each pixel summing to 1. image: uint8 or float (H, W, 3) RGB in
    0..255, on the same device. Returns float (C, H, W) probabilities.
    """
    if params.window < 3 or params.window % 2 == 0:
        raise ValueError(f"window must be odd and >= 3, not {params.window}")
    img = image.permute(2, 0, 1).float()
    offsets, k = _kernel_weights(img, params)
    r = params.window // 2
    h, w = probs.shape[1:]
    unary = probs.float().clamp_min(1e-8).log()
    q = probs.float()
    for _ in range(params.iterations):
        qp = torch.nn.functional.pad(q, (r, r, r, r))
        msg = torch.zeros_like(q)
        for (dy, dx), kk in zip(offsets, k):
            msg += kk * qp[:, r + dy:r + dy + h, r + dx:r + dx + w]
        q = torch.softmax(unary + msg, dim=0)
    return q
