"""Dense CRFs for SegNet1's output (DeepLab-v1's post-processing), in torch on any device.

Both minimise, by mean-field inference, the fully connected Potts model of Krähenbühl &
Koltun (2011) with DeepLab's two Gaussian kernels:

    E(x) = sum_i -log P_i(x_i) + sum_{i != j} [x_i != x_j] k(i, j)
    k(i, j) = w_bi exp(-|p_i - p_j|^2 / 2 s_xy^2 - |I_i - I_j|^2 / 2 s_rgb^2)
            + w_pos exp(-|p_i - p_j|^2 / 2 s_pos^2)

`dense_crf_full` (the default, `method="full"`) is the real one: every pair of pixels,
through permutohedral-lattice filtering (Adams, Baek & Davis, 2010) exactly as in
Krähenbühl's code (pydensecrf: the same lattice, the same blur, symmetric kernel
normalisation), written with tensor operations (splat by index_add, blur by gathers along
the d+1 lattice axes, slice), so it runs on the GPU in `boxseg-eval`. `dense_crf_window`
(`method="window"`) is the local-window approximation of ConvCRF (Teichmann & Cipolla,
2018): the kernels cut to a window x window neighbourhood and not normalised; fast, but it
drops the long-range bilateral term (xy std 121) that DeepLab's CRF is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


METHODS = ("full", "window")


@dataclass(frozen=True)
class CRFParams:
    """DeepLab-v1's CRF settings (bi_w 4, bi_xy_std 121, bi_rgb_std 5, pos_w 3, pos_xy_std 3,
    10 iterations). `method`: "full" (fully connected, permutohedral lattice) or "window"
    (the kernels cut to a `window` x `window` neighbourhood)."""
    iterations: int = 10
    method: str = "full"
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
    """Refine class probabilities with mean-field inference (`params.method`).

    probs: float (C, H, W), each pixel summing to 1. image: uint8 or float (H, W, 3) RGB in
    0..255, on the same device. Returns float (C, H, W) probabilities.
    """
    if params.method == "full":
        return dense_crf_full(probs, image, params)
    if params.method != "window":
        raise ValueError(f"CRF method must be one of {', '.join(METHODS)}, not {params.method!r}")
    return dense_crf_window(probs, image, params)


def dense_crf_window(probs: torch.Tensor, image: torch.Tensor, params: CRFParams = CRFParams()) -> torch.Tensor:
    """The window approximation (ConvCRF): each kernel summed over the window x window
    neighbourhood only (centre left out), unnormalised."""
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


# -- the fully connected CRF ---------------------------------------------------------------


class Permutohedral:
    """Gaussian filtering over feature space: out_i ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j, in
    O(N d^2) on the permutohedral lattice. A transcription into tensor operations of
    Krähenbühl's `Permutohedral` (densecrf / pydensecrf): the same elevation, rounding to
    the nearest remainder-0 point, simplex ranks, barycentric weights, blur [1/2 1 1/2]
    along each of the d+1 axes and the alpha scaling, so the two agree to rounding (their
    sums run in another order)."""

    def __init__(self, features: torch.Tensor):
        """features: float32 (N, d), already divided by the kernel's standard deviations."""
        f = features.float()
        n, d = f.shape
        dev = f.device
        self.n, self.d = n, d
        # elevate onto the hyperplane sum(x) = 0 of R^{d+1}, scaled as in the reference (float32)
        inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))   # a float in the reference
        scale = torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], dtype=torch.float32,
                             device=dev)
        cf = f * scale                                            # (N, d)
        elevated = torch.empty((n, d + 1), dtype=torch.float32, device=dev)
        sm = torch.zeros(n, dtype=torch.float32, device=dev)
        for j in range(d, 0, -1):                                 # the reference's order of float sums
            elevated[:, j] = sm - j * cf[:, j - 1]
            sm = sm + cf[:, j - 1]
        elevated[:, 0] = sm
        # the closest remainder-0 lattice point, its simplex (ranks) and barycentric weights
        down = 1.0 / (d + 1)
        v = elevated * down
        up_pt, down_pt = torch.ceil(v) * (d + 1), torch.floor(v) * (d + 1)
        rem0 = torch.where(up_pt - elevated < elevated - down_pt, up_pt, down_pt)
        total = (rem0 * down).sum(1).to(torch.int64)              # an integer: the reference sums rd2 * down
        diff = elevated - rem0
        rank = (diff[:, None, :] > diff[:, :, None]).sum(2)       # how many coordinates exceed each one
        # ties: the reference counts j > i with diff_i < diff_j, and for j < i with diff_j >= diff_i
        ties = (diff[:, None, :] == diff[:, :, None]) & (torch.arange(d + 1, device=dev)[None, :] <
                                                         torch.arange(d + 1, device=dev)[:, None])
        rank = rank + ties.sum(2)
        rank = rank + total[:, None]
        low, high = rank < 0, rank > d
        rank = torch.where(low, rank + d + 1, torch.where(high, rank - d - 1, rank))
        rem0 = torch.where(low, rem0 + d + 1, torch.where(high, rem0 - d - 1, rem0))
        bary = torch.zeros((n, d + 2), dtype=torch.float32, device=dev)
        vv = (elevated - rem0) * down
        bary.scatter_add_(1, d - rank, vv)
        bary.scatter_add_(1, d - rank + 1, -vv)
        bary[:, 0] = (bary[:, 0].double() + (1.0 + bary[:, d + 1].double())).float()  # double in the reference
        self.weights = bary[:, : d + 1]                           # (N, d+1)
        # the d+1 vertices of each point's simplex: key = rem0 + canonical[remainder][rank]
        r = torch.arange(d + 1, device=dev)
        canonical = torch.where(r[None, :] <= d - r[:, None], r[:, None], r[:, None] - (d + 1))  # [remainder, rank]
        rem0_i = rem0.to(torch.int64)
        keys = rem0_i[:, None, :d] + canonical[:, rank[:, :d]].permute(1, 0, 2)  # (N, d+1, d)
        self._coder = _KeyCoder(keys.reshape(-1, d))
        codes = self._coder.encode(keys.reshape(-1, d))
        self.lattice, inverse = torch.unique(codes, sorted=True, return_inverse=True)
        self.offsets = inverse.view(n, d + 1)                     # lattice index of each vertex
        m = self.lattice.numel()
        self.m = m
        # neighbours along each lattice axis j: key -1 everywhere, +d on j (and the reverse)
        lat_keys = self._coder.decode(self.lattice)               # (M, d)
        self.neighbours = []
        for j in range(d + 1):
            n1, n2 = lat_keys - 1, lat_keys + 1
            if j < d:
                n1[:, j] = lat_keys[:, j] + d
                n2[:, j] = lat_keys[:, j] - d
            self.neighbours.append((self._find(n1), self._find(n2)))

    def _find(self, keys: torch.Tensor) -> torch.Tensor:
        """Lattice index + 1 of each key, 0 where the key is not in the lattice."""
        codes, valid = self._coder.encode(keys, check=True)
        at = torch.searchsorted(self.lattice, codes).clamp(max=self.m - 1)
        found = valid & (self.lattice[at] == codes)
        return torch.where(found, at + 1, torch.zeros_like(at))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """values float32 (N, C) -> (N, C): splat, blur along every axis, slice."""
        n, c = values.shape
        lat = torch.zeros((self.m + 1, c), dtype=torch.float32, device=values.device)  # row 0: "not found"
        lat.index_add_(0, self.offsets.reshape(-1) + 1, (self.weights[:, :, None] * values[:, None, :]).reshape(-1, c))
        new = torch.zeros_like(lat)
        for j in range(self.d + 1):
            n1, n2 = self.neighbours[j]
            torch.add(lat[1:], 0.5 * (lat[n1] + lat[n2]), out=new[1:])
            lat, new = new, lat
        alpha = float(np.float32(1.0) / np.float32(1.0 + 2.0 ** (-self.d)))
        out = torch.zeros((n, c), dtype=torch.float32, device=values.device)
        for j in range(self.d + 1):  # the reference's order; its SSE path (> 2 values) scales w by alpha first
            w, v = self.weights[:, j, None], lat[self.offsets[:, j] + 1]
            out += (w * alpha) * v if c > 2 else (w * v) * alpha
        return out


class _KeyCoder:
    """Integer lattice keys (K, d) <-> one int64 each (mixed radix over the keys' range,
    widened by d + 1 on each side so that every neighbour of a key is representable)."""

    def __init__(self, keys: torch.Tensor):
        d = keys.shape[1]
        self.low = keys.min(0).values - (d + 1)
        span = keys.max(0).values + (d + 1) - self.low + 1
        self.span = span
        radix = torch.ones_like(span)
        for i in range(d - 2, -1, -1):
            radix[i] = radix[i + 1] * span[i + 1]
        if float(span.double().log2().sum()) >= 62:
            raise ValueError("permutohedral lattice keys out of range (features too spread: check the stds)")
        self.radix = radix

    def encode(self, keys: torch.Tensor, check: bool = False):
        shifted = keys - self.low
        codes = (shifted * self.radix).sum(-1)
        if not check:
            return codes
        valid = ((shifted >= 0) & (shifted < self.span)).all(-1)
        return codes, valid

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = []
        rest = codes
        for r in self.radix.tolist():
            out.append(torch.div(rest, r, rounding_mode="floor"))
            rest = rest - out[-1] * r
        return torch.stack(out, -1) + self.low


class _DenseKernel:
    """One Gaussian kernel over `features` with symmetric normalisation, as Krähenbühl's
    DenseKernel (NORMALIZE_SYMMETRIC, the default of pydensecrf)."""

    def __init__(self, features: torch.Tensor, weight: float):
        self.lattice = Permutohedral(features)
        ones = torch.ones((features.shape[0], 1), dtype=torch.float32, device=features.device)
        self.norm = (1.0 / torch.sqrt(self.lattice.filter(ones).double() + 1e-20)).float()  # (N, 1), double there
        self.weight = weight

    def message(self, q: torch.Tensor) -> torch.Tensor:
        """q (N, C) -> weight * normalised filtered q (N, C): the Potts message."""
        return self.weight * (self.lattice.filter(q * self.norm) * self.norm)


def crf_kernels(image: torch.Tensor, params: CRFParams = CRFParams()) -> list[_DenseKernel]:
    """DeepLab's two kernels over an (H, W, 3) image: Gaussian on position (pos_xy_std) and
    bilateral on position and colour (bi_xy_std, bi_rgb_std), features as pydensecrf's
    DenseCRF2D builds them (x / s, y / s, rgb / s)."""
    h, w = image.shape[:2]
    dev = image.device
    yy, xx = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    pos = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)

    def div(t: torch.Tensor, s: float) -> torch.Tensor:  # a true division (a scalar divisor may become a product)
        return t / torch.full_like(t, s)

    kernels = [_DenseKernel(div(pos, params.pos_xy_std), params.pos_w)]
    rgb = div(image.reshape(-1, 3).float(), params.bi_rgb_std)
    kernels.append(_DenseKernel(torch.cat([div(pos, params.bi_xy_std), rgb], 1), params.bi_w))
    return kernels


def dense_crf_full(probs: torch.Tensor, image: torch.Tensor, params: CRFParams = CRFParams(),
                   clip: float = 1e-5) -> torch.Tensor:
    """The fully connected CRF (Krähenbühl & Koltun; DeepLab's settings): unary -log(clip(P)),
    Potts pairwise terms through the two kernels, `params.iterations` mean-field updates
    Q <- softmax(log P + sum_k w_k K_k Q). probs float (C, H, W); image (H, W, 3) RGB 0..255."""
    c, h, w = probs.shape
    # the log in double, rounded once: a process's first float32 log on the CPU could run a
    # low-accuracy MKL kernel over one thread's chunk (4e-5 off; boxseg.threads.resolve_mkl_vml),
    # which moved the result 1.4e-5 from the reference when called outside a command
    unary = probs.float().clamp(clip, 1.0).double().log().float().reshape(c, -1).t()  # (N, C) = -energy
    kernels = crf_kernels(image, params)
    q = torch.softmax(unary, 1)
    for _ in range(params.iterations):
        msg = unary.clone()
        for k in kernels:
            msg += k.message(q)
        q = torch.softmax(msg, 1)
    return q.t().reshape(c, h, w)


def refine_in_boxes(fg: torch.Tensor, inside: torch.Tensor, image: torch.Tensor,
                    params: CRFParams = CRFParams()) -> torch.Tensor:
    """SegNet2's proposals refined with the CRF inside their boxes, as BCM and BANA refine
    box-driven pseudo labels: fg float (K, H, W), each class's foreground probability;
    inside bool (K, H, W), the union of the class's boxes; image (H, W, 3) RGB. The unary
    of class k is its probability inside its boxes (0 elsewhere), of background the
    probability that no covering class holds; returns the refined (K, H, W) marginals, 0
    outside each class's boxes."""
    p = torch.where(inside, fg.float(), torch.zeros((), device=fg.device))
    probs = torch.cat([torch.prod(1 - p, 0, keepdim=True), p])
    probs = probs / probs.sum(0, keepdim=True)
    q = dense_crf(probs, image, params)
    return torch.where(inside, q[1:], torch.zeros((), device=fg.device))
