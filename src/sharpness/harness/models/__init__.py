"""The networks of the SAM paper's experiments (Foret et al., ICLR 2021) for 32x32 and 28x28 images,
plus small models for CPU runs; :func:`build_model` makes one from its name.
"""

from sharpness.harness.models.pyramidnet import PyramidNet, shake_drop
from sharpness.harness.models.registry import MODEL_NAMES, build_model
from sharpness.harness.models.resnet import CifarResNet, ResNet18
from sharpness.harness.models.shake_shake import ShakeShakeNet, shake_shake
from sharpness.harness.models.small import MLP, SmallCNN
from sharpness.harness.models.wide_resnet import WideResNet

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "WideResNet",
    "CifarResNet",
    "ResNet18",
    "ShakeShakeNet",
    "shake_shake",
    "PyramidNet",
    "shake_drop",
    "MLP",
    "SmallCNN",
]
