"""build_model: names, options, errors and the parameter counts of the full-size networks."""

import pytest
import torch
from torch import nn

from sharpness.harness.models import (
    MLP,
    MODEL_NAMES,
    CifarResNet,
    PyramidNet,
    ResNet18,
    ShakeShakeNet,
    SmallCNN,
    WideResNet,
    build_model,
)


def _count(name: str, num_classes: int = 10, **kwargs) -> int:
    # Built on the meta device: no memory, no initialisation cost, nothing is run.
    with torch.device("meta"):
        model = build_model(name, num_classes, **kwargs)
    return sum(p.numel() for p in model.parameters())


# (name, exact count for 10 classes, published count, allowed deviation from the published count)
PUBLISHED = [
    ("wrn-28-10", 36_479_194, 36.5e6, 0.01 * 36.5e6),
    ("wrn-16-8", 10_961_370, 11.0e6, 0.01 * 11.0e6),
    ("resnet20", 269_722, 0.27e6, 0.01 * 0.27e6),
    ("resnet32", 464_154, 0.46e6, 0.01 * 0.46e6),
    # He et al. give two significant digits ("1.7M"); the architecture has 1.73M, 1.6% above.
    ("resnet110", 1_727_962, 1.7e6, 0.05e6),
    ("resnet18", 11_173_962, 11.2e6, 0.01 * 11.2e6),
    ("shake-shake-26-2x96d", 26_192_922, 26.2e6, 0.01 * 26.2e6),
    # Han et al.'s 26.0M matches the convolution weights alone (25,991,328); BatchNorm adds 210,864.
    ("pyramidnet-272-200", 26_210_842, 26.0e6, 0.01 * 26.0e6),
]


@pytest.mark.parametrize(("name", "exact", "published", "tolerance"), PUBLISHED)
def test_parameter_count_matches_published(name: str, exact: int, published: float, tolerance: float) -> None:
    count = _count(name)
    assert count == exact
    assert abs(count - published) <= tolerance


def test_more_parameter_counts() -> None:
    assert _count("resnet44") == 658_586
    assert _count("resnet56") == 853_018
    assert _count("wrn-40-10") == 55_841_754
    assert _count("pyramidnet-272-200-shakedrop") == 26_210_842
    # 100 classes: only the classifier grows, by 90 x (640 + 1).
    assert _count("wrn-28-10", num_classes=100) == 36_479_194 + 90 * 641
    # One input channel: only the stem shrinks, by 2 x 9 x 16.
    assert _count("resnet32", in_channels=1) == 464_154 - 2 * 9 * 16


def test_convolution_weights_of_pyramidnet_272_200() -> None:
    with torch.device("meta"):
        model = build_model("pyramidnet-272-200", 10)
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv == 25_991_328
    assert model.fc.in_features == 864


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("wrn-16-8", WideResNet),
        ("resnet20", CifarResNet),
        ("resnet44", CifarResNet),
        ("resnet56", CifarResNet),
        ("resnet18", ResNet18),
        ("shake-shake-26-2x32d", ShakeShakeNet),
        ("pyramidnet-110-48", PyramidNet),
        ("pyramidnet-110-48-shakedrop", PyramidNet),
        ("mlp", MLP),
        ("cnn-small", SmallCNN),
        (" WRN-16-8 ", WideResNet),
    ],
)
def test_names_build_their_family(name: str, cls: type) -> None:
    with torch.device("meta"):
        assert type(build_model(name, 10)) is cls


def test_model_names_lists_the_patterns() -> None:
    assert MODEL_NAMES == (
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


@pytest.mark.parametrize("name", ["vgg16", "resnet34", "wrn-28", "wrn-28-10-bn", "shake-shake-26-96d", ""])
def test_unknown_name_lists_accepted_names(name: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(name, 10)
    message = str(info.value)
    assert message.startswith(f"unknown model {name!r}; accepted names: ")
    assert message.endswith(", ".join(MODEL_NAMES))


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("wrn-27-10", "WRN depth must be 6n \\+ 4"),
        ("wrn-4-10", "WRN depth must be 6n \\+ 4"),
        ("wrn-28-0", "WRN width must be >= 1"),
        ("shake-shake-25-2x96d", "Shake-Shake depth must be 6n \\+ 2"),
        ("pyramidnet-111-200", "PyramidNet depth must be 9n \\+ 2"),
    ],
)
def test_invalid_sizes(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, 10)


def test_options() -> None:
    assert build_model("mlp", 10, 1, image_size=8, hidden=16).net[1].in_features == 64
    assert build_model("mlp", 10, 1, image_size=8, hidden=16).net[3].in_features == 16
    assert build_model("cnn-small", 5, 1, width=4).fc.in_features == 8
    wrn = build_model("wrn-10-1", 10, dropout=0.25)
    assert [m.p for m in wrn.modules() if isinstance(m, nn.Dropout)] == [0.25, 0.25, 0.25]
    shakedrop = build_model("pyramidnet-11-4-shakedrop", 10, final_keep_prob=0.25)
    assert shakedrop.blocks[-1].keep_prob == 0.25


def test_rejected_options_and_arguments() -> None:
    with pytest.raises(TypeError, match="model 'resnet20' got options \\['dropout'\\]; it accepts none"):
        build_model("resnet20", 10, dropout=0.1)
    with pytest.raises(TypeError, match="it accepts \\['dropout', 'norm'\\]"):
        build_model("wrn-10-1", 10, hidden=3)
    with pytest.raises(ValueError, match="norm must be 'bn' or 'none', got 'ln'"):
        build_model("wrn-10-1", 10, norm="ln")
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\), got 1.0"):
        build_model("wrn-10-1", 10, dropout=1.0)
    with pytest.raises(ValueError, match="must be >= 1, got 0, 3, 32"):
        build_model("resnet20", 0)
