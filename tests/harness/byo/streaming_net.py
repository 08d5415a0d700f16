"""A user's own model, imported as ``streaming_net:make`` with this folder on ``PYTHONPATH`` (not as a package)."""

from torch import nn


def make(num_classes: int, width: int = 4, in_channels: int = 3, dropout: float = 0.25) -> nn.Module:
    """Convolution, BatchNorm, ReLU, global pooling, dropout (so that a resumed run must restore torch's generator)
    and a linear classifier ``4``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)),
        nn.Linear(width, num_classes),
    )
