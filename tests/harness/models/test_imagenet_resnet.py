"""ResNet-50/101/152: exact parameter counts, torchvision's state-dict layout, v1.5 strides, one training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sharpness.harness.config import ConfigError, load_config
from sharpness.harness.models import build_model
from sharpness.harness.models.imagenet_resnet import ImageNetResNet

# torchvision's published counts for 1000 classes (its model cards: 25,557,032 / 44,549,160 / 60,192,808).
PUBLISHED = {"resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808}


def _meta(name: str, num_classes: int = 1000, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):  # no memory, no initialisation cost
        return build_model(name, num_classes, **kwargs)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_are_torchvisions(name: str) -> None:
    assert sum(p.numel() for p in _meta(name).parameters()) == PUBLISHED[name]
    # 10 classes: only the classifier shrinks, by 990 x (2048 + 1).
    assert sum(p.numel() for p in _meta(name, 10).parameters()) == PUBLISHED[name] - 990 * 2049


def _published_layout(blocks: tuple[int, ...], num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """The state dict of torchvision's ResNet, written from the architecture (He et al. 2016, Table 1, and
    torchvision's module names), independently of the model under test."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        keys.update({f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")})
        keys[f"{prefix}.num_batches_tracked"] = ()

    keys["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if i == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    keys["fc.weight"] = (num_classes, 2048)
    keys["fc.bias"] = (num_classes,)
    return keys


@pytest.mark.parametrize(
    ("name", "blocks"), [("resnet50", (3, 4, 6, 3)), ("resnet101", (3, 4, 23, 3)), ("resnet152", (3, 8, 36, 3))]
)
def test_state_dict_layout_is_torchvisions(name: str, blocks: tuple[int, ...]) -> None:
    expected = _published_layout(blocks)
    got = {k: tuple(v.shape) for k, v in _meta(name).state_dict().items()}
    assert list(got) == list(expected)  # same names in the same order
    assert got == expected
    params = sum(
        torch.Size(s).numel() for k, s in expected.items() if not k.rsplit(".", 1)[1].startswith(("running", "num"))
    )
    assert params == PUBLISHED[name]


def test_published_layout_state_dict_round_trips_by_name() -> None:
    gen = torch.Generator().manual_seed(0)
    published = {}
    for key, shape in _published_layout((3, 4, 6, 3)).items():
        published[key] = (
            torch.randint(0, 100, shape, generator=gen)
            if key.endswith("num_batches_tracked")
            else torch.randn(shape, generator=gen)
        )
    model = build_model("resnet50", 1000)
    model.load_state_dict(published, strict=True)
    back = model.state_dict()
    assert list(back) == list(published)
    assert all(torch.equal(back[k], published[k]) for k in published)


def test_v1_5_strides_and_zero_init_residual() -> None:
    model = ImageNetResNet(50, 10)
    for stage in (2, 3, 4):
        block = getattr(model, f"layer{stage}")[0]
        assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
        assert block.downsample[0].stride == (2, 2)
    assert model.layer1[0].downsample[0].stride == (1, 1) and model.layer1[1].downsample is None
    assert all(bool((b.bn3.weight == 1).all()) for layer in (model.layer1, model.layer4) for b in layer)
    zero = build_model("resnet50", 10, zero_init_residual=True)
    bn3 = [m.bn3.weight for layer in (zero.layer1, zero.layer2, zero.layer3, zero.layer4) for m in layer]
    assert len(bn3) == 16 and all(bool((w == 0).all()) for w in bn3)
    assert bool((zero.layer1[0].bn2.weight == 1).all()) and bool((zero.bn1.weight == 1).all())


def test_options_are_checked() -> None:
    config = load_config("demo-digits", ["model=resnet50", "model_kwargs={zero_init_residual: true}"])
    assert config.model_kwargs == {"zero_init_residual": True}
    with pytest.raises(ConfigError, match="zero_init_residual=1 does not fit model 'resnet50'"):
        load_config("demo-digits", ["model=resnet50", "model_kwargs={zero_init_residual: 1}"])
    with pytest.raises(ConfigError, match="model 'resnet101' has no option 'width'"):
        load_config("demo-digits", ["model=resnet101", "model_kwargs={width: 4}"])
    with pytest.raises(ValueError, match="depth must be one of \\[50, 101, 152\\], got 34"):
        ImageNetResNet(34)


def test_resnet50_trains_two_tiny_batches() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", 5, zero_init_residual=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = model.layer3[2].conv2.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(2):
        x = torch.randn(2, 3, 64, 64, generator=gen)
        y = torch.randint(0, 5, (2,), generator=gen)
        out = model(x)
        assert out.shape == (2, 5)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.layer3[2].conv2.weight, before)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)
