"""PyramidNet with bottleneck blocks (Han, Kim & Kim, "Deep Pyramidal Residual Networks", CVPR 2017),
optionally with ShakeDrop (Yamada, Iwamura, Akiba & Kise, "ShakeDrop Regularization for Deep Residual
Learning", IEEE Access 2019, arXiv:1802.02375).

PyramidNet-``depth``-``alpha`` for 32x32 inputs: a 3x3 stem to 16 channels with BatchNorm, then
n = (depth-2)/9 bottleneck blocks in each of three stages (the first of stages 2 and 3 with stride 2).
Additive widening: the k-th block (k = 1..3n) has ``round(16 + k * alpha / (3n))`` bottleneck channels and
4 times that many outputs. Each block is BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN; its shortcut is
the input (2x2 average-pooled where the block downsamples) with zero channels appended. The head is
BN-ReLU, global average pooling and a linear classifier. All of this follows the authors' code;
PyramidNet-272-200 has 26.0M parameters.

ShakeDrop multiplies the residual branch of block l (l = 1..L, L = 3n) by b + (1 - b) α in the forward
pass and by b + (1 - b) β in the backward pass, with b ~ Bernoulli(p_l), α ~ U(-1, 1), β ~ U(0, 1) drawn
per sample, and p_l = 1 - (l / L)(1 - p_L) decaying linearly to p_L = 0.5. At evaluation the branch is
multiplied by its expectation E[b + (1 - b) α] = p_l.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharpness.harness.models.layers import conv1x1, conv3x3, global_avg_pool, init_weights, pad_channels

__all__ = ["ShakeDropFunction", "shake_drop", "PyramidBottleneck", "PyramidNet"]


class ShakeDropFunction(torch.autograd.Function):
    """``forward_scale * x`` forward; gradient ``backward_scale * g`` backward (scales get none)."""

    @staticmethod
    def forward(x: Tensor, forward_scale: Tensor, backward_scale: Tensor) -> Tensor:
        return forward_scale * x

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (backward_scale,) = ctx.saved_tensors
        return backward_scale * grad, None, None


def shake_drop(x: Tensor, keep_prob: float, training: bool) -> Tensor:
    """ShakeDrop of a residual branch output ``x`` with per-sample gate b ~ Bernoulli(``keep_prob``).

    In training, b, α ~ U(-1, 1) and β ~ U(0, 1) are drawn, in that order, with :func:`torch.rand`
    on ``x``'s device and in its dtype (reproducible under :func:`torch.manual_seed`, no host
    synchronisation). Otherwise the output is ``keep_prob * x``.
    """
    if not training:
        return keep_prob * x
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    gate = (torch.rand(shape, device=x.device, dtype=x.dtype) < keep_prob).to(x.dtype)
    alpha = torch.rand(shape, device=x.device, dtype=x.dtype) * 2 - 1
    beta = torch.rand(shape, device=x.device, dtype=x.dtype)
    forward_scale = gate + (1 - gate) * alpha
    backward_scale = gate + (1 - gate) * beta
    return ShakeDropFunction.apply(x, forward_scale, backward_scale)


class PyramidBottleneck(nn.Module):
    """Bottleneck block of PyramidNet; ``keep_prob`` set means the branch goes through ShakeDrop."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, keep_prob: float | None = None) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.branch = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            conv1x1(in_channels, planes),
            nn.BatchNorm2d(planes),
            nn.ReLU(),
            conv3x3(planes, planes, stride),
            nn.BatchNorm2d(planes),
            nn.ReLU(),
            conv1x1(planes, out_channels),
            nn.BatchNorm2d(out_channels),
        )
        self.stride = stride
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.keep_prob = keep_prob

    def shortcut(self, x: Tensor) -> Tensor:
        """The input, average-pooled if the block downsamples, zero-padded to the output channels."""
        if self.stride != 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        if self.in_channels != self.out_channels:
            x = pad_channels(x, self.out_channels)
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        if self.keep_prob is not None:
            out = shake_drop(out, self.keep_prob, self.training)
        return out + self.shortcut(x)


class PyramidNet(nn.Module):
    """Bottleneck PyramidNet-``depth``-``alpha`` (Han et al., CVPR 2017); ``depth`` = 9n + 2.

    With ``shakedrop=True`` every block applies ShakeDrop (Yamada et al., 2019) with the linear-decay
    keep probabilities ending at ``final_keep_prob`` (p_L).
    """

    def __init__(
        self,
        depth: int,
        alpha: int,
        num_classes: int,
        in_channels: int = 3,
        shakedrop: bool = False,
        final_keep_prob: float = 0.5,
    ) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"bottleneck PyramidNet depth must be 9n + 2 with n >= 1 (11, 110, 272, ...), got {depth}")
        if alpha < 0:
            raise ValueError(f"PyramidNet alpha must be >= 0, got {alpha}")
        if not 0.0 <= final_keep_prob <= 1.0:
            raise ValueError(f"final_keep_prob must be in [0, 1], got {final_keep_prob}")
        n = (depth - 2) // 9
        total = 3 * n
        add_rate = alpha / total

        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        channels = 16
        # Accumulated in floating point and rounded per block, exactly as in the authors' code.
        width = 16.0
        for l in range(1, total + 1):
            width += add_rate
            stride = 2 if l in (n + 1, 2 * n + 1) else 1
            keep_prob = 1.0 - l / total * (1.0 - final_keep_prob) if shakedrop else None
            block = PyramidBottleneck(channels, int(round(width)), stride, keep_prob)
            blocks.append(block)
            channels = block.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.bn_final = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.bn1(self.conv1(x)))
        return self.fc(global_avg_pool(F.relu(self.bn_final(out))))
