"""Building blocks shared by several model families: convolutions, initialisation, shortcuts.

The initialisation is the one of He et al., "Delving Deep into Rectifiers" (ICCV 2015), as used by
the reference code of every network here (fb.resnet.torch, Wide ResNet, Shake-Shake, PyramidNet):
convolution weights :math:`\\mathcal N(0, 2/n)` with :math:`n = k^2 c_{out}` (``fan_out``), convolution
biases 0, BatchNorm weight 1 and bias 0, linear biases 0 (linear weights keep PyTorch's default).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["conv3x3", "conv1x1", "init_weights", "pad_channels", "global_avg_pool"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A 3x3 convolution with padding 1."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """A 1x1 convolution."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)


def init_weights(model: nn.Module, mode: Literal["fan_in", "fan_out"] = "fan_out") -> None:
    """He-normal convolutions, unit/zero BatchNorm, zero biases, in place over ``model``'s modules."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def pad_channels(x: Tensor, channels: int) -> Tensor:
    """Append zero channels to an NCHW tensor so that it has ``channels`` channels."""
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))


def global_avg_pool(x: Tensor) -> Tensor:
    """Mean over the spatial dimensions: (N, C, H, W) -> (N, C), for any H and W."""
    return x.mean(dim=(2, 3))
