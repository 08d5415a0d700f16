"""ResNet-50, -101 and -152 for ImageNet (He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, Table 1), the networks of the SAM paper's Table 2 (Foret et al., ICLR 2021, Section 3.1).

The layout is torchvision's ("v1.5"): the bottleneck's stride sits on its 3x3 convolution, not on the first 1x1
as in the original paper, and every module has torchvision's name (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer1.0.downsample.0``, ``fc``), so a published torchvision state dict loads with ``strict=True``.

Stem: 7x7 stride-2 convolution to 64 channels, BatchNorm, ReLU, 3x3 stride-2 max-pooling; four stages of
bottleneck blocks (1x1 to ``w``, 3x3 at ``w``, 1x1 to ``4w`` with ``w`` = 64, 128, 256, 512; the first block of
stages 2-4 has stride 2, the first of every stage a 1x1 projection shortcut); global average pooling; a linear
classifier. Initialisation as torchvision's: He-normal (fan-out) convolutions, BatchNorm weight 1 and bias 0,
PyTorch's default for the classifier. ``zero_init_residual`` sets the weight of each block's last BatchNorm to
0, so that every block starts as the identity (Goyal et al., "Accurate, Large Minibatch SGD", 2017, Section 5.1;
the SAM paper's public code does the same).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sharpness.harness.models.layers import conv1x1, conv3x3

__all__ = ["Bottleneck", "ImageNetResNet", "STAGE_BLOCKS"]

STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
"""Bottleneck blocks per stage of each depth (He et al., Table 1)."""


class Bottleneck(nn.Module):
    """ReLU(BN(conv1x1(ReLU(BN(conv3x3_s(ReLU(BN(conv1x1(x))))))) + shortcut(x)), ``4 * width`` channels out."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ImageNetResNet(nn.Module):
    """ResNet-``depth`` (50, 101 or 152) with ``num_classes`` logits; see the module docstring."""

    def __init__(
        self, depth: int, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False
    ) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for stage, blocks in enumerate(STAGE_BLOCKS[depth]):
            width = 64 * 2**stage
            layer = []
            for i in range(blocks):
                layer.append(Bottleneck(channels, width, stride=2 if stage > 0 and i == 0 else 1))
                channels = width * Bottleneck.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
