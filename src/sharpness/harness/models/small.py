"""Small networks for quick CPU runs (e.g. on 8x8 one-channel images); not from the SAM paper.

* :class:`MLP`: flatten, two hidden linear layers with ReLU, linear classifier.
* :class:`SmallCNN`: three conv3x3-BN-ReLU layers (widths w, 2w, 2w; strides 1, 2, 2), global average
  pooling and a linear classifier; it accepts any input size.

Convolutions use He initialisation (He et al., ICCV 2015), like the larger models.
"""

from __future__ import annotations

from torch import Tensor, nn

from sharpness.harness.models.layers import conv3x3, global_avg_pool, init_weights

__all__ = ["MLP", "SmallCNN"]


class MLP(nn.Module):
    """Flatten-Linear-ReLU-Linear-ReLU-Linear for ``in_channels`` x ``image_size`` x ``image_size`` inputs."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, hidden: int = 128) -> None:
        super().__init__()
        if image_size < 1 or hidden < 1:
            raise ValueError(f"image_size and hidden must be >= 1, got {image_size} and {hidden}")
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Three conv3x3-BN-ReLU layers of widths ``width``, 2 ``width``, 2 ``width``, pooling, linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, stride in ((width, 1), (2 * width, 2), (2 * width, 2)):
            layers += [conv3x3(channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU()]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(global_avg_pool(self.features(x)))
