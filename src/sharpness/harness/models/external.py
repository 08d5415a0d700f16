"""A model the user brings, named by import path: ``package.module:factory``.

The contract: ``factory`` is a callable attribute of the importable module ``package.module`` (a dotted attribute
path such as ``module:Class.create`` is followed too), called as ``factory(num_classes=N, **model_kwargs)`` and
returning an ``nn.Module`` whose output is ``(batch, N)`` logits. The data set's ``in_channels`` and
``image_size`` are passed as well where the factory's signature names a parameter so (not through ``**kwargs``);
other factories take such values from ``model_kwargs`` under their own names (timm's ``in_chans``).
Examples: ``timm.models:efficientnet_b7`` where timm is installed (``model_kwargs: {pretrained: false}``), or
``mylab.nets:make`` from the user's own code on ``PYTHONPATH``. This is how the SAM paper's Table 3 EfficientNets
are trained here without being written here.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from torch import nn

__all__ = ["ExternalModelError", "is_external", "check_external_name", "build_external"]

_NAME = re.compile(r"(?P<module>[A-Za-z_]\w*(\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)")


class ExternalModelError(ValueError):
    """The import path does not lead to a usable model factory; the message is one line saying why."""


def is_external(name: str) -> bool:
    """Whether ``name`` is an import path (it contains ``:``) rather than one of the built-in model names."""
    return ":" in name


def check_external_name(name: str) -> tuple[str, str]:
    """``(module, attribute)`` of ``package.module:factory``, without importing anything."""
    match = _NAME.fullmatch(name.strip())
    if match is None:
        raise ExternalModelError(f"model {name!r}: expected an import path package.module:factory")
    return match["module"], match["attr"]


def _factory(name: str) -> Any:
    module_name, attr = check_external_name(name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ExternalModelError(f"model {name!r}: cannot import module {module_name!r} ({err})") from err
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ExternalModelError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ExternalModelError(f"model {name!r}: {attr!r} is a {type(target).__name__}, not callable")
    return target


def build_external(
    name: str, num_classes: int, *, in_channels: int | None = None, image_size: int | None = None, **model_kwargs: Any
) -> nn.Module:
    """Import ``package.module:factory`` and return ``factory(num_classes=num_classes, **model_kwargs)``, adding
    ``in_channels`` and ``image_size`` where the factory has parameters of those names.

    Raises:
        ExternalModelError: the module cannot be imported, lacks the attribute, the attribute is not callable,
            its signature does not take these arguments, or it does not return an ``nn.Module``.
    """
    factory = _factory(name)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none; call and see
        signature = None
    if signature is not None:
        for key, value in (("in_channels", in_channels), ("image_size", image_size)):
            if value is not None and key in signature.parameters and key not in model_kwargs:
                model_kwargs[key] = value
        try:
            signature.bind(num_classes=num_classes, **model_kwargs)
        except TypeError as err:
            given = ", ".join(["num_classes", *sorted(model_kwargs)])
            raise ExternalModelError(f"model {name!r}: the factory cannot be called with ({given}): {err}") from err
    model = factory(num_classes=num_classes, **model_kwargs)
    if not isinstance(model, nn.Module):
        raise ExternalModelError(f"model {name!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model
