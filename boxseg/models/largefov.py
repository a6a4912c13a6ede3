"""SegNet1: DeepLab-v1 LargeFOV on VGG16 (METHOD.md).

A 321x321 input gives 41x41 logits (output stride 8); 20.5 M parameters at 21 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from boxseg.models.vgg import TORCHVISION_CONV_INDICES, VGG16_CONVS_PER_BLOCK, VGG16Trunk, _ch


class LargeFOV(nn.Module):
    def __init__(self, num_classes: int = 21, width: float = 1.0, batch_norm: bool = False, dropout: float = 0.5,
                 convs_per_block: tuple[int, ...] = VGG16_CONVS_PER_BLOCK, fc6_dilation: int = 12):
        super().__init__()
        self.trunk = VGG16Trunk(width, batch_norm, tuple(convs_per_block))
        fc = _ch(1024, width)
        # fc6: 3x3 dilation 12 (the large field of view on 41x41 maps; small presets with
        # 13x13 maps scale it down, else most taps read padding); fc7: 1x1; both ReLU + dropout.
        self.fc6 = nn.Conv2d(self.trunk.out_channels, fc, 3, padding=fc6_dilation, dilation=fc6_dilation)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        # element-wise dropout, as Caffe's Dropout layer in DeepLab-v1 (not whole channels)
        self.drop6, self.drop7 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.fc8 = nn.Conv2d(fc, num_classes, 1)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc8.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (B, 3, H, W) normalised -> logits (B, C, ceil(H/8), ceil(W/8))."""
        x = self.trunk(x)
        x = self.drop6(torch.relu(self.fc6(x)))
        x = self.drop7(torch.relu(self.fc7(x)))
        return self.fc8(x)

    def classifier_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weights, biases) of fc8, which the paper trains at 10x / 20x the base lr."""
        return [self.fc8.weight], [self.fc8.bias]

    def load_vgg16(self, state: dict[str, torch.Tensor]) -> None:
        """Initialise from torchvision VGG16 ImageNet weights (METHOD.md).

        features.N -> the 13 convs; classifier.0 (4096 x 25088) reshaped to 4096x512x7x7 and
        subsampled (every 4th filter, every 3rd tap: rows 0,3,6) to 1024x512x3x3 -> fc6;
        classifier.3 (4096x4096) subsampled to 1024x1024 -> fc7. Only width 1.0 without
        batch norm has the shapes for this.
        """
        if self.trunk.batch_norm or self.fc6.out_channels != 1024 or len(self.trunk.convs()) != 13:
            raise ValueError("VGG16 ImageNet weights fit only width=1.0, all 13 convs, without batch_norm")
        with torch.no_grad():
            for conv, idx in zip(self.trunk.convs(), TORCHVISION_CONV_INDICES):
                conv.weight.copy_(state[f"features.{idx}.weight"])
                conv.bias.copy_(state[f"features.{idx}.bias"])
            w6 = state["classifier.0.weight"].reshape(4096, 512, 7, 7)[::4, :, ::3, ::3]
            self.fc6.weight.copy_(w6)
            self.fc6.bias.copy_(state["classifier.0.bias"][::4])
            self.fc7.weight.copy_(state["classifier.3.weight"][::4, ::4, None, None])
            self.fc7.bias.copy_(state["classifier.3.bias"][::4])
