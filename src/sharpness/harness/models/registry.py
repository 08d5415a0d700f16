"""Build a model from its name, as used by the experiment configs and the command line."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin, get_type_hints

from torch import nn

from sharpness.harness.models.external import build_external, check_external_name, is_external
from sharpness.harness.models.imagenet_resnet import ImageNetResNet
from sharpness.harness.models.pyramidnet import PyramidNet
from sharpness.harness.models.resnet import CifarResNet, ResNet18
from sharpness.harness.models.shake_shake import ShakeShakeNet
from sharpness.harness.models.small import MLP, SmallCNN
from sharpness.harness.models.wide_resnet import WideResNet

__all__ = ["MODEL_NAMES", "build_model", "check_model_options"]

MODEL_NAMES: tuple[str, ...] = (
    "wrn-<depth>-<width>",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet18",
    "resnet50",
    "resnet101",
    "resnet152",
    "shake-shake-<depth>-2x<width>d",
    "pyramidnet-<depth>-<alpha>",
    "pyramidnet-<depth>-<alpha>-shakedrop",
    "mlp",
    "cnn-small",
    "<package.module>:<factory>",
)
"""The accepted model names; ``<...>`` stands for a positive integer, except in the last: a model brought by
import path (:mod:`sharpness.harness.models.external`)."""

# Each builder takes (match, num_classes, in_channels, image_size, **family kwargs).
_Builder = Callable[..., nn.Module]


def _wrn(
    m: re.Match[str],
    num_classes: int,
    in_channels: int,
    image_size: int,
    dropout: float = 0.0,
    norm: Literal["bn", "none"] = "bn",
) -> nn.Module:
    return WideResNet(int(m["depth"]), int(m["width"]), num_classes, in_channels, dropout, norm)


def _cifar_resnet(m: re.Match[str], num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(int(m["depth"]), num_classes, in_channels)


def _resnet18(m: re.Match[str], num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return ResNet18(num_classes, in_channels)


def _imagenet_resnet(
    m: re.Match[str], num_classes: int, in_channels: int, image_size: int, zero_init_residual: bool = False
) -> nn.Module:
    return ImageNetResNet(int(m["depth"]), num_classes, in_channels, zero_init_residual)


def _shake_shake(m: re.Match[str], num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return ShakeShakeNet(int(m["depth"]), int(m["width"]), num_classes, in_channels)


def _pyramidnet(m: re.Match[str], num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return PyramidNet(int(m["depth"]), int(m["alpha"]), num_classes, in_channels)


def _pyramidnet_shakedrop(
    m: re.Match[str], num_classes: int, in_channels: int, image_size: int, final_keep_prob: float = 0.5
) -> nn.Module:
    return PyramidNet(int(m["depth"]), int(m["alpha"]), num_classes, in_channels, True, final_keep_prob)


def _mlp(m: re.Match[str], num_classes: int, in_channels: int, image_size: int, hidden: int = 128) -> nn.Module:
    return MLP(num_classes, in_channels, image_size, hidden)


def _cnn_small(m: re.Match[str], num_classes: int, in_channels: int, image_size: int, width: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)


_BUILDERS: tuple[tuple[re.Pattern[str], _Builder], ...] = (
    (re.compile(r"wrn-(?P<depth>\d+)-(?P<width>\d+)"), _wrn),
    (re.compile(r"resnet(?P<depth>20|32|44|56|110)"), _cifar_resnet),
    (re.compile(r"resnet18"), _resnet18),
    (re.compile(r"resnet(?P<depth>50|101|152)"), _imagenet_resnet),
    (re.compile(r"shake-shake-(?P<depth>\d+)-2x(?P<width>\d+)d"), _shake_shake),
    (re.compile(r"pyramidnet-(?P<depth>\d+)-(?P<alpha>\d+)"), _pyramidnet),
    (re.compile(r"pyramidnet-(?P<depth>\d+)-(?P<alpha>\d+)-shakedrop"), _pyramidnet_shakedrop),
    (re.compile(r"mlp"), _mlp),
    (re.compile(r"cnn-small"), _cnn_small),
)


def _builder(name: str) -> tuple[_Builder, re.Match[str]]:
    key = name.strip().lower()
    for pattern, builder in _BUILDERS:
        match = pattern.fullmatch(key)
        if match is not None:
            return builder, match
    raise ValueError(f"unknown model {name!r}; accepted names: {', '.join(MODEL_NAMES)}")


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits a builder option's annotation (``bool``, ``int``, ``float``, ``Literal[...]``)."""
    if get_origin(annotation) is Literal:
        return value in get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


def _kind(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(repr, get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Check a model name and its family options against the builder's signature.

    Raises ``ValueError`` with one line: the unknown name, or the option that is wrong and the options (with
    their types and defaults) that the family accepts. An import path is only checked for its form here; its
    module is imported when the model is built.
    """
    if is_external(name):
        check_external_name(name)
        return
    builder, _ = _builder(name)
    params = list(inspect.signature(builder).parameters.values())[4:]
    hints = get_type_hints(builder)
    allowed = ", ".join(f"{p.name} ({_kind(hints.get(p.name))}, default {p.default!r})" for p in params) or "none"
    for key, value in options.items():
        param = next((p for p in params if p.name == key), None)
        if param is None:
            hint = ""
            if isinstance(key, str) and ":" in key and value is None:
                hint = " (YAML needs a space after the colon: {width: 4}, not {width:4})"
            raise ValueError(f"model_kwargs: model {name!r} has no option {key!r}{hint}; it accepts {allowed}")
        if not _accepts(hints.get(key), value):
            raise ValueError(f"model_kwargs: {key}={value!r} does not fit model {name!r}; it accepts {allowed}")


def build_model(name: str, num_classes: int, in_channels: int = 3, *, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """The network called ``name`` (one of :data:`MODEL_NAMES`) with ``num_classes`` outputs.

    Args:
        name: model name, e.g. ``"wrn-28-10"``, ``"resnet32"``, ``"shake-shake-26-2x96d"``,
            ``"pyramidnet-272-200-shakedrop"``, ``"resnet50"``, ``"cnn-small"`` (case-insensitive), or an import
            path ``package.module:factory`` called as ``factory(num_classes=..., **kwargs)``
            (:func:`sharpness.harness.models.external.build_external`).
        num_classes: number of logits.
        in_channels: channels of the input images (3 for CIFAR/SVHN, 1 for MNIST/Fashion-MNIST).
        image_size: height (= width) of the input images; only ``mlp`` depends on it, every other
            model pools globally and accepts any size.
        **kwargs: family options: ``wrn``: ``dropout`` (default 0.0), ``norm`` (``"bn"`` or ``"none"``);
            ``pyramidnet-*-shakedrop``: ``final_keep_prob`` (p_L, default 0.5); ``mlp``: ``hidden``
            (default 128); ``cnn-small``: ``width`` (default 32); ``resnet50/101/152``: ``zero_init_residual``
            (default False). Other families take none; an import path takes what its factory takes.

    Raises:
        ValueError: for an unknown name or invalid sizes; TypeError for an option the family lacks.
    """
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise ValueError(
            f"num_classes, in_channels and image_size must be >= 1, got {num_classes}, {in_channels}, {image_size}"
        )
    if is_external(name):
        return build_external(name, num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    builder, match = _builder(name)
    signature = inspect.signature(builder)
    try:
        signature.bind(match, num_classes, in_channels, image_size, **kwargs)
    except TypeError as err:
        options = list(signature.parameters)[4:]
        raise TypeError(f"model {name!r} got options {sorted(kwargs)}; it accepts {options or 'none'}") from err
    return builder(match, num_classes, in_channels, image_size, **kwargs)
