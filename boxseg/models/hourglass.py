"""SegNet2: a class-agnostic binary segmenter, a one-stack Hourglass (METHOD.md).

Input: image (3) + box mask B_m (1) [+ score map S_m (1) from round 2]; output: 2 logits
(background, foreground) at stride 4. The default is the light CenterNet-style hourglass of
the reference code: 5 levels, widths 96, 96, 128, 128, 128, 192, two basic residual blocks
per level and four at the bottom, stride-2 convs down, nearest x2 up, a 7x7 stride-2 stem.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """Basic residual block (two 3x3 convs), with a 1x1 projection when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def _blocks(cin: int, cout: int, n: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(Residual(cin, cout, stride), *[Residual(cout, cout) for _ in range(n - 1)])


class HourglassLevel(nn.Module):
    """One level: a skip branch at this resolution and a down-inner-up branch, summed."""

    def __init__(self, widths: list[int], blocks: int, bottom_blocks: int):
        super().__init__()
        cur, nxt = widths[0], widths[1]
        self.skip = _blocks(cur, cur, blocks)
        self.down = _blocks(cur, nxt, blocks, stride=2)
        self.inner = (HourglassLevel(widths[1:], blocks, bottom_blocks) if len(widths) > 2
                      else _blocks(nxt, nxt, bottom_blocks))
        self.up_blocks = _blocks(nxt, cur, blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up_blocks(self.inner(self.down(x)))
        # nearest x2 up; `size=` keeps odd sizes exact
        return self.skip(x) + F.interpolate(y, size=x.shape[-2:], mode="nearest")


class Hourglass(nn.Module):
    """SegNet2. `widths` has depth+1 entries (one per level plus the bottom)."""

    def __init__(self, in_channels: int = 4, widths: tuple[int, ...] = (96, 96, 128, 128, 128, 192),
                 blocks: int = 2, bottom_blocks: int = 4, stem_channels: int = 64):
        super().__init__()
        if in_channels not in (4, 5):
            raise ValueError(f"SegNet2 takes 4 (image + box) or 5 (+ score map) channels, not {in_channels}")
        self.in_channels = in_channels
        self.widths = tuple(widths)
        # stem: 7x7 stride 2, then a stride-2 residual -> stride 4
        self.stem = nn.Sequential(conv_bn(in_channels, stem_channels, 7, 2), Residual(stem_channels, widths[0], 2))
        self.hourglass = HourglassLevel(list(widths), blocks, bottom_blocks)
        self.head = nn.Sequential(conv_bn(widths[0], widths[0], 3), nn.Conv2d(widths[0], 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (B, 4|5, H, W) -> logits (B, 2, H/4, W/4); channel 1 is foreground."""
        return self.head(self.hourglass(self.stem(x)))

    def expand_to_five_channels(self) -> "Hourglass":
        """Round r >= 2 starts from round 1: a copy with a 5th input channel whose stem
        weights are zero, so the new network computes exactly what round 1 did and learns
        to use S_m from there. Starting fresh would throw away what round 1 learned about
        objectness and cost a full round of training again."""
        if self.in_channels != 4:
            raise ValueError("only a 4-channel SegNet2 can be expanded")
        new = Hourglass(5, self.widths, len(self.hourglass.skip), len(_bottom(self.hourglass)), self.stem[0][0].out_channels)
        state = self.state_dict()
        w = state["stem.0.0.weight"]
        state["stem.0.0.weight"] = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
        new.load_state_dict(state)
        return new


def _bottom(level: HourglassLevel) -> nn.Sequential:
    while isinstance(level.inner, HourglassLevel):
        level = level.inner
    return level.inner
