"""Shared by the exporters: sidecar metadata, example inputs, and the parity measures."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from boxseg.data.files import write_bytes_atomic


def sidecar(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".json")


def write_sidecar(path: Path, meta: dict) -> None:
    write_bytes_atomic(sidecar(path), json.dumps(meta, indent=2).encode())


def example_inputs(meta: dict, batch: int, seed: int = 0) -> torch.Tensor:
    """Normalised-image-like inputs: N(0, 1) image channels, a box mask (a centred box) and,
    for 5 channels, a score map in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    s = meta["input_size"]
    x = torch.randn(batch, 3, s, s, generator=g)
    if meta["kind"] == "segnet1":
        return x
    box = torch.zeros(batch, 1, s, s)
    for b in range(batch):
        y0, x0 = (torch.randint(0, s // 2, (2,), generator=g)).tolist()
        box[b, :, y0: y0 + s // 3, x0: x0 + s // 3] = 1
    chans = [x, box] + ([torch.rand(batch, 1, s, s, generator=g)] if meta["in_channels"] == 5 else [])
    return torch.cat(chans, 1)


def parity(ref: torch.Tensor, out: torch.Tensor, kind: str) -> dict:
    """fp32 criterion: max |diff| <= 1e-4 x max |ref|. fp16 criterion: >= 99.5% identical
    labels (argmax) and, for SegNet2, foreground-mask IoU >= 0.99. Either way every output
    must be finite: an overflow to +-inf can keep the argmax yet make every softmax NaN."""
    ref, out = ref.float().cpu(), out.float().cpu()
    diff = float((ref - out).abs().max())
    scale = float(ref.abs().max())
    la, lb = ref.argmax(1), out.argmax(1)
    res = {"max_abs_diff": diff, "max_abs_ref": scale, "rel_diff": diff / max(scale, 1e-12),
           "label_agreement": float((la == lb).float().mean()), "non_finite": int((~torch.isfinite(out)).sum())}
    if kind == "segnet2":
        inter, union = float(((la == 1) & (lb == 1)).sum()), float(((la == 1) | (lb == 1)).sum())
        res["mask_iou"] = inter / union if union else 1.0
    return res


def parity_ok(p: dict, precision: str) -> bool:
    if p.get("non_finite", 0):
        return False
    if precision == "fp32":
        return p["rel_diff"] <= 1e-4
    return p["label_agreement"] >= 0.995 and p.get("mask_iou", 1.0) >= 0.99


def export_parity(ref: torch.Tensor, out: torch.Tensor, kind: str, precision: str, checked_on: str, batch: int) -> dict:
    """The parity record stored with an artifact: the measures, where and how, and the verdict."""
    p = parity(ref, out, kind)
    p.update({"checked_on": checked_on, "batch": batch, "inputs": "random (seeded)", "passed": parity_ok(p, precision)})
    return p
