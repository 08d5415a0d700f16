"""A model brought by import path (``tests.harness.models.byo_model:make``), as a user's own module would be."""

from torch import nn

NOT_CALLABLE = 3


def make(num_classes: int, width: int = 8, in_channels: int = 1) -> nn.Module:
    """A 3x3 convolution, ReLU, global average pooling and a linear classifier ``fc``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def not_a_model(num_classes: int) -> dict:
    return {"num_classes": num_classes}
