"""Residual networks for 32x32 images (He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016).

* :class:`CifarResNet`: the paper's CIFAR-10 networks of Section 4.2, depth 6n + 2 (ResNet-20, 32, 44,
  56, 110): a 3x3 stem to 16 channels, three stages of n post-activation basic blocks with 16, 32 and
  64 channels, global average pooling and a linear classifier. Shortcuts are option A: parameter-free
  identities, subsampled by 2 and zero-padded in channels where the shape changes. ResNet-32 (0.46M
  parameters) is the SAM paper's label-noise model (Foret et al., ICLR 2021, Section 3.3).
* :class:`ResNet18`: the 18-layer ImageNet architecture of the same paper (four stages of two basic
  blocks, 64 to 512 channels, option-B projection shortcuts) in its common CIFAR form: a 3x3 stride-1
  stem and no max-pooling (11.2M parameters for 10 classes).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sharpness.harness.models.layers import conv1x1, conv3x3, global_avg_pool, init_weights, pad_channels

__all__ = ["CifarResNet", "ResNet18", "BasicBlock"]


class _ZeroPadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and append zero channels."""

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return pad_channels(x[:, :, :: self.stride, :: self.stride], self.out_channels)


class BasicBlock(nn.Module):
    """Post-activation basic block: ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x)).

    ``shortcut="A"`` zero-pads (no parameters), ``"B"`` projects with a 1x1 convolution and BatchNorm;
    either is only used where the block changes the shape, the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "A":
                self.shortcut = _ZeroPadShortcut(out_channels, stride)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
            else:
                raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _StagedResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, stages of basic blocks (the first of each later stage has stride 2), head."""

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks_per_stage: tuple[int, ...],
        shortcut: str,
        num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, (out_channels, count) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, shortcut))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(global_avg_pool(out))


class CifarResNet(_StagedResNet):
    """ResNet-``depth`` for CIFAR (He et al., CVPR 2016, Section 4.2); ``depth`` = 6n + 2."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, ...), got {depth}")
        n = (depth - 2) // 6
        super().__init__((16, 32, 64), (n, n, n), "A", num_classes, in_channels)


class ResNet18(_StagedResNet):
    """ResNet-18 (He et al., CVPR 2016, Table 1) with a 3x3 stride-1 stem and no max-pooling."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__((64, 128, 256, 512), (2, 2, 2, 2), "B", num_classes, in_channels)
