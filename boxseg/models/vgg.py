"""VGG16 trunk as DeepLab-v1 uses it, and loading torchvision's ImageNet VGG16 weights.

Layer indices follow torchvision's `vgg16().features` (convs at 0, 2, 5, 7, 10, 12, 14, 17,
19, 21, 24, 26, 28) so that a torchvision state dict maps one-to-one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# (out channels, dilation) per conv; "P" a pool. Blocks 1-3 pool with stride 2, 4-5 with stride 1.
VGG16_CFG: tuple = (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P")
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def vgg_layout(convs_per_block: tuple[int, ...]) -> tuple:
    """VGG16_CFG with the first n convs of each block kept (the full VGG16 at (2, 2, 3, 3, 3)).

    Fewer convs per block is for the CPU demo preset, trained from scratch: the 13-conv
    trunk at width 0.25 needs about three times the steps of a 5-conv one to get going
    (measured on the synthetic world), and no ImageNet weights exist for either.
    """
    out: list = []
    block, kept = 0, 0
    for v in VGG16_CFG:
        if v == "P":
            out.append(v)
            block, kept = block + 1, 0
        elif kept < convs_per_block[block]:
            out.append(v)
            kept += 1
    return tuple(out)


def _ch(c: int, width: float) -> int:
    return max(8, int(round(c * width)))


class VGG16Trunk(nn.Module):
    """conv1_1 .. pool5 (+ the 3x3 stride-1 average pool) of DeepLab-LargeFOV: output stride 8.

    pool1-3: 3x3 stride 2 pad 1; pool4, pool5: 3x3 stride 1 pad 1; conv5_x dilation 2.
    `batch_norm` adds BatchNorm after each conv, for training small widths from scratch
    (no ImageNet weights exist for them); the paper model has none.
    """

    def __init__(self, width: float = 1.0, batch_norm: bool = False,
                 convs_per_block: tuple[int, ...] = VGG16_CONVS_PER_BLOCK):
        super().__init__()
        if len(convs_per_block) != 5 or any(not 1 <= n <= 3 for n in convs_per_block):
            raise ValueError(f"convs_per_block must be 5 counts in 1..3, not {convs_per_block!r}")
        layers: list[nn.Module] = []
        in_ch, pools = 3, 0
        for v in vgg_layout(convs_per_block):
            if v == "P":
                stride = 2 if pools < 3 else 1
                layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
                pools += 1
                continue
            dilation = 2 if pools == 4 else 1
            out_ch = _ch(v, width)
            conv = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
            layers += [conv, nn.BatchNorm2d(out_ch)] if batch_norm else [conv]
            layers.append(nn.ReLU(inplace=True))
            in_ch = out_ch
        layers.append(nn.AvgPool2d(3, stride=1, padding=1))
        self.features = nn.Sequential(*layers)
        self.out_channels = in_ch
        self.batch_norm = batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]


def load_vgg16_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a torchvision VGG16 state dict (a local file; nothing is downloaded) with
    `weights_only=True`, so a file holding code is refused."""
    from boxseg.models.checkpoint import load_state_file

    state = load_state_file(Path(path))
    needed = [f"features.{i}.weight" for i in TORCHVISION_CONV_INDICES] + ["classifier.0.weight", "classifier.3.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"{path}: not a torchvision VGG16 state dict (missing {missing[:3]})")
    return state
