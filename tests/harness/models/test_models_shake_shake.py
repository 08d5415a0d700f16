"""Shake-Shake: the autograd function, the per-sample coefficients, the eval mean and the network layout."""

import torch
import torch.nn.functional as F
from torch import nn

from sharpness.harness.models import build_model
from sharpness.harness.models.shake_shake import ShakeShakeBlock, ShakeShakeFunction, shake_shake


def test_function_forward_mixes_and_backward_splits_exactly() -> None:
    x1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 1, 1, 2).requires_grad_()
    x2 = torch.tensor([[5.0, 6.0], [7.0, 8.0]]).view(2, 1, 1, 2).requires_grad_()
    alpha = torch.tensor([0.25, 0.75]).view(2, 1, 1, 1)
    beta = torch.tensor([0.5, 0.125]).view(2, 1, 1, 1)
    out = ShakeShakeFunction.apply(x1, x2, alpha, beta)
    assert out.flatten().tolist() == [4.0, 5.0, 4.0, 5.0]
    out.backward(torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 1, 1, 2))
    assert x1.grad.flatten().tolist() == [0.5, 1.0, 0.375, 0.5]
    assert x2.grad.flatten().tolist() == [0.5, 1.0, 2.625, 3.5]


def test_training_draws_alpha_then_beta_per_sample() -> None:
    x1 = torch.randn(5, 3, 4, 4, requires_grad=True)
    x2 = torch.randn(5, 3, 4, 4, requires_grad=True)
    g = torch.randn(5, 3, 4, 4)
    torch.manual_seed(11)
    out = shake_shake(x1, x2, training=True)
    out.backward(g)
    torch.manual_seed(11)
    alpha = torch.rand(5, 1, 1, 1)
    beta = torch.rand(5, 1, 1, 1)
    assert torch.equal(out, alpha * x1 + (1 - alpha) * x2)
    assert torch.equal(x1.grad, beta * g)
    assert torch.equal(x2.grad, (1 - beta) * g)
    # Independent per-sample coefficients (a batch-level or alpha = beta variant would fail here).
    assert len(set(alpha.flatten().tolist())) == 5
    assert not torch.equal(alpha, beta)


def test_eval_is_the_exact_mean() -> None:
    x1 = torch.randn(4, 3, 5, 5, requires_grad=True)
    x2 = torch.randn(4, 3, 5, 5, requires_grad=True)
    out = shake_shake(x1, x2, training=False)
    assert torch.equal(out, (x1 + x2) / 2)
    out.sum().backward()
    assert torch.equal(x1.grad, torch.full_like(x1, 0.5))
    assert torch.equal(x2.grad, torch.full_like(x2, 0.5))


def test_block_in_eval_adds_the_mean_of_its_branches() -> None:
    torch.manual_seed(0)
    for in_channels, out_channels, stride in [(8, 8, 1), (4, 8, 2), (4, 6, 1)]:
        block = ShakeShakeBlock(in_channels, out_channels, stride)
        block.train()
        block(torch.randn(8, in_channels, 6, 6))  # non-trivial BatchNorm running statistics
        block.eval()
        x = torch.randn(3, in_channels, 6, 6)
        h = F.relu(x)
        shortcut = x if block.shortcut is None else block.shortcut(h)
        expected = shortcut + (block.branch1(h) + block.branch2(h)) / 2
        assert torch.equal(block(x), expected)


def test_block_in_training_is_random_and_reproducible() -> None:
    torch.manual_seed(0)
    block = ShakeShakeBlock(4, 4, 1).train()
    x = torch.randn(6, 4, 5, 5)
    torch.manual_seed(1)
    first = block(x)
    torch.manual_seed(1)
    again = block(x)
    torch.manual_seed(2)
    other = block(x)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_downsampling_shortcut_sees_subsampled_and_shifted_pixels() -> None:
    block = ShakeShakeBlock(1, 2, 2)
    shortcut = block.shortcut
    with torch.no_grad():
        shortcut.conv1.weight.fill_(1.0)
        shortcut.conv2.weight.fill_(1.0)
    shortcut.bn.eval()
    h = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    out = shortcut(h)
    # BN in eval with fresh statistics divides by sqrt(1 + eps).
    scale = (1 + shortcut.bn.eps) ** -0.5
    expected = torch.tensor([[[1.0, 3.0], [9.0, 11.0]], [[0.0, 0.0], [0.0, 6.0]]]) * scale
    torch.testing.assert_close(out[0], expected, rtol=1e-7, atol=0.0)


def test_network_layout() -> None:
    model = build_model("shake-shake-26-2x96d", 10)
    assert len(model.blocks) == 12
    widths = [block.branch1[0].out_channels for block in model.blocks]
    assert widths == [96] * 4 + [192] * 4 + [384] * 4
    strides = [block.branch1[0].stride[0] for block in model.blocks]
    assert strides == [1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]
    with_projection = [i for i, block in enumerate(model.blocks) if block.shortcut is not None]
    assert with_projection == [0, 4, 8]
    assert model.fc.in_features == 384
    first = model.blocks[0].branch1[0].weight
    # He initialisation, fan_out = 3 * 3 * 96: std sqrt(2 / 864) = 0.0481.
    assert abs(first.std().item() - (2 / 864) ** 0.5) < 0.002
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
