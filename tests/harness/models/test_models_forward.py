"""Every family on small instances: output shape, finite gradients, memory formats, torch.compile."""

import pytest
import torch
from torch import nn

from sharpness.harness.models import build_model

# Small members of every family (same code paths as the full-size networks).
SMALL = [
    ("wrn-10-2", {}),
    ("wrn-10-2", {"norm": "none", "dropout": 0.3}),
    ("resnet20", {}),
    ("resnet18", {}),
    ("shake-shake-8-2x8d", {}),
    ("pyramidnet-11-12", {}),
    ("pyramidnet-11-12-shakedrop", {}),
    ("mlp", {}),
    ("cnn-small", {}),
]
SMALL_IDS = [name + "".join(f"-{k}={v}" for k, v in kwargs.items()) for name, kwargs in SMALL]
INPUTS = [(3, 32), (1, 28)]


def _check_forward_backward(model: nn.Module, channels: int, size: int, train: bool) -> None:
    model.train(train)
    x = torch.randn(3, channels, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("channels", "size"), INPUTS, ids=["rgb32", "gray28"])
@pytest.mark.parametrize(("name", "kwargs"), SMALL, ids=SMALL_IDS)
def test_forward_backward(name: str, kwargs: dict, channels: int, size: int, train: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, channels, image_size=size, **kwargs)
    _check_forward_backward(model, channels, size, train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["mlp", "cnn-small"])
def test_small_models_on_8x8_single_channel(name: str, train: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, 1, image_size=8)
    _check_forward_backward(model, 1, 8, train)


def test_default_small_model_sizes() -> None:
    mlp = build_model("mlp", 10, 1, image_size=8)
    assert sum(p.numel() for p in mlp.parameters()) == (64 * 128 + 128) + (128 * 128 + 128) + (128 * 10 + 10)
    cnn = build_model("cnn-small", 10, 1)
    assert [m.out_channels for m in cnn.modules() if isinstance(m, nn.Conv2d)] == [32, 64, 64]
    assert [m.stride for m in cnn.modules() if isinstance(m, nn.Conv2d)] == [(1, 1), (2, 2), (2, 2)]


@pytest.mark.parametrize(("name", "kwargs"), SMALL, ids=SMALL_IDS)
def test_channels_last_matches_contiguous(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["shake-shake-8-2x4d", "pyramidnet-11-4-shakedrop", "resnet20", "wrn-10-1", "cnn-small"]
)
def test_compiles_as_one_graph_and_matches_eager(name: str) -> None:
    # fullgraph=True fails on any graph break: data-dependent control flow, .item(), host reads.
    torch._dynamo.reset()
    model = build_model(name, 7, 1).to(memory_format=torch.channels_last).train()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 1, 8, 8).to(memory_format=torch.channels_last)
    torch.manual_seed(3)
    out = compiled(x)
    out.sum().backward()
    torch.manual_seed(3)
    assert torch.equal(out, model(x))
