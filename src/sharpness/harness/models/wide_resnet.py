"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k for 32x32 inputs: a 3x3 stem convolution to 16 channels, three stages of (d-4)/6 pre-activation
blocks (BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3) of widths 16k, 32k, 64k with strides 1, 2, 2, then
BN-ReLU, global average pooling and a linear classifier. A block whose shape changes takes its shortcut
through a 1x1 convolution of the pre-activated input, as in the authors' code. WRN-28-10 has 36.5M
parameters for 10 classes.

``norm="none"`` is the BatchNorm-free variant used for the Hessian spectra of the SAM paper (Foret et
al., ICLR 2021, Figure 3). Every BatchNorm becomes an identity, and to keep that network trainable:

* all convolutions get a bias (initialised to 0);
* convolutions use He initialisation with ``fan_in`` so the forward signal keeps its scale without
  normalisation;
* the last convolution of every residual branch starts at zero, so at initialisation each block is
  its shortcut and depth does not blow up the activations (as in Fixup, Zhang et al., ICLR 2019, and
  the zero-initialised residual branches of Goyal et al., 2017).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from sharpness.harness.models.layers import conv1x1, conv3x3, global_avg_pool, init_weights

__all__ = ["WideResNet"]

Norm = Literal["bn", "none"]


def _norm_layer(norm: Norm) -> Callable[[int], nn.Module]:
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "none":
        return lambda channels: nn.Identity()
    raise ValueError(f"norm must be 'bn' or 'none', got {norm!r}")


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float, norm: Norm = "bn") -> None:
        super().__init__()
        make_norm = _norm_layer(norm)
        bias = norm == "none"
        self.bn1 = make_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride, bias=bias)
        self.bn2 = make_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels, 1, bias=bias)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv1x1(in_channels, out_channels, stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` (Zagoruyko & Komodakis, BMVC 2016); ``depth`` = 6n + 4."""

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
        norm: Norm = "bn",
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        make_norm = _norm_layer(norm)
        bias = norm == "none"
        n = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)

        self.conv1 = conv3x3(in_channels, 16, bias=bias)
        blocks: list[nn.Module] = []
        channels = 16
        for stage, out_channels in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(WideBasicBlock(channels, out_channels, stride, dropout, norm))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.bn = make_norm(channels)
        self.fc = nn.Linear(channels, num_classes)

        init_weights(self, mode="fan_in" if norm == "none" else "fan_out")
        if norm == "none":
            for block in self.blocks:
                nn.init.zeros_(block.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.conv1(x))
        return self.fc(global_avg_pool(F.relu(self.bn(out))))
