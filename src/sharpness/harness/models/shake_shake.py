"""Shake-Shake regularised ResNets (Gastaldi, "Shake-Shake regularization", arXiv:1705.07485, 2017).

Shake-Shake-``depth``-2x``width``d, the "Shake-Shake-Image" variant: each residual block has two
branches ReLU-conv3x3-BN-ReLU-conv3x3-BN whose outputs are mixed by a coefficient α ~ U(0, 1) drawn
per sample in the forward pass, while the gradient is split by an independent β ~ U(0, 1) per sample
in the backward pass; at evaluation both coefficients are 0.5. The network follows the author's code:
a 3x3 stem to 16 channels with BatchNorm, three stages of (depth-2)/6 blocks of widths
``width``, 2 ``width``, 4 ``width`` (strides 1, 2, 2), then ReLU, global average pooling and a
linear classifier. A block that changes the shape has the author's shortcut: ReLU, then two 1x1
convolutions of half the output width, one on the subsampled input and one on the input shifted by a
pixel right and down, concatenated and batch-normalised. Shake-Shake-26-2x96d has 26.2M parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharpness.harness.models.layers import conv1x1, conv3x3, global_avg_pool, init_weights

__all__ = ["ShakeShakeFunction", "shake_shake", "ShakeShakeBlock", "ShakeShakeNet"]


class ShakeShakeFunction(torch.autograd.Function):
    """``alpha * x1 + (1 - alpha) * x2`` forward; gradients ``beta * g`` and ``(1 - beta) * g`` backward.

    ``alpha`` and ``beta`` are tensors that broadcast against ``x1`` (one value per sample for the
    image-level variant); they receive no gradient.
    """

    @staticmethod
    def forward(x1: Tensor, x2: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        return alpha * x1 + (1 - alpha) * x2

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[3])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        (beta,) = ctx.saved_tensors
        return beta * grad, (1 - beta) * grad, None, None


def shake_shake(x1: Tensor, x2: Tensor, training: bool) -> Tensor:
    """Mix two branch outputs: random per-sample α (forward) and β (backward) in training, 0.5 otherwise.

    α and β are drawn, in that order, with :func:`torch.rand` on ``x1``'s device and in its dtype, so a
    call is reproducible under :func:`torch.manual_seed` and never synchronises with the host.
    """
    if not training:
        return 0.5 * (x1 + x2)
    shape = (x1.shape[0],) + (1,) * (x1.dim() - 1)
    alpha = torch.rand(shape, device=x1.device, dtype=x1.dtype)
    beta = torch.rand(shape, device=x1.device, dtype=x1.dtype)
    return ShakeShakeFunction.apply(x1, x2, alpha, beta)


def _branch(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """conv3x3-BN-ReLU-conv3x3-BN; the block applies the leading ReLU once for both branches."""
    return nn.Sequential(
        conv3x3(in_channels, out_channels, stride),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        conv3x3(out_channels, out_channels),
        nn.BatchNorm2d(out_channels),
    )


class _ShiftedProjection(nn.Module):
    """The author's shortcut for a shape change, applied to the already ReLU-activated input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = conv1x1(in_channels, out_channels // 2)
        self.conv2 = conv1x1(in_channels, out_channels - out_channels // 2)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        path1 = self.conv1(x[:, :, ::s, ::s])
        shifted = F.pad(x[:, :, :-1, :-1], (1, 0, 1, 0))
        path2 = self.conv2(shifted[:, :, ::s, ::s])
        return self.bn(torch.cat([path1, path2], dim=1))


class ShakeShakeBlock(nn.Module):
    """``shortcut(x) + shake_shake(branch1(relu(x)), branch2(relu(x)))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.branch1 = _branch(in_channels, out_channels, stride)
        self.branch2 = _branch(in_channels, out_channels, stride)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _ShiftedProjection(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x)
        shortcut = x if self.shortcut is None else self.shortcut(h)
        return shortcut + shake_shake(self.branch1(h), self.branch2(h), self.training)


class ShakeShakeNet(nn.Module):
    """Shake-Shake-``depth``-2x``width``d (Gastaldi, 2017); ``depth`` = 6n + 2."""

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"Shake-Shake depth must be 6n + 2 with n >= 1 (8, 14, 20, 26, ...), got {depth}")
        if width < 1:
            raise ValueError(f"Shake-Shake width must be >= 1, got {width}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        channels = 16
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ShakeShakeBlock(channels, out_channels, stride))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.bn1(self.conv1(x)))
        return self.fc(global_avg_pool(F.relu(out)))
