"""PyramidNet widening and shortcuts; ShakeDrop's function, coefficients, decay and evaluation scaling."""

import pytest
import torch

from sharpness.harness.models import build_model
from sharpness.harness.models.pyramidnet import PyramidBottleneck, ShakeDropFunction, shake_drop


def test_additive_widening_and_strides() -> None:
    # n = 1 block per stage, alpha = 12: widths 16 + 4k rounded, outputs 4x.
    model = build_model("pyramidnet-11-12", 10)
    assert [b.branch[1].out_channels for b in model.blocks] == [20, 24, 28]
    assert [b.out_channels for b in model.blocks] == [80, 96, 112]
    assert [b.stride for b in model.blocks] == [1, 2, 2]
    assert model.fc.in_features == 112
    assert all(b.keep_prob is None for b in model.blocks)


def test_widening_of_pyramidnet_272_200() -> None:
    with torch.device("meta"):
        model = build_model("pyramidnet-272-200", 10)
    planes = [b.branch[1].out_channels for b in model.blocks]
    assert len(planes) == 90
    assert planes[:4] == [18, 20, 23, 25]
    assert planes[-1] == 216
    assert [i for i, b in enumerate(model.blocks) if b.stride == 2] == [30, 60]


def test_shortcut_pools_and_pads_with_zeros() -> None:
    block = PyramidBottleneck(2, 1, stride=2)
    x = torch.arange(8.0).view(1, 2, 2, 2)
    assert block.shortcut(x).flatten().tolist() == [1.5, 5.5, 0.0, 0.0]
    # Odd sizes: the pooling rounds up like the strided convolution (7 -> 4).
    assert block.shortcut(torch.ones(1, 2, 7, 7)).shape == (1, 4, 4, 4)
    assert block.branch(torch.ones(1, 2, 7, 7)).shape == (1, 4, 4, 4)


def test_linear_decay_of_keep_probabilities() -> None:
    model = build_model("pyramidnet-20-12-shakedrop", 10)
    keep = [b.keep_prob for b in model.blocks]
    assert keep == pytest.approx([11 / 12, 10 / 12, 9 / 12, 8 / 12, 7 / 12, 6 / 12], abs=1e-15)
    assert keep[-1] == 0.5


def test_function_scales_forward_and_backward_exactly() -> None:
    x = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).requires_grad_()
    forward_scale = torch.tensor([1.0, -0.5, 0.25]).view(3, 1, 1, 1)
    backward_scale = torch.tensor([1.0, 0.75, 0.125]).view(3, 1, 1, 1)
    out = ShakeDropFunction.apply(x, forward_scale, backward_scale)
    assert out.flatten().tolist() == [1.0, -1.0, 0.75]
    out.backward(torch.tensor([2.0, 4.0, 8.0]).view(3, 1, 1, 1))
    assert x.grad.flatten().tolist() == [2.0, 3.0, 1.0]


def test_training_draws_gate_alpha_beta_per_sample() -> None:
    x = torch.randn(64, 2, 3, 3, requires_grad=True)
    g = torch.randn(64, 2, 3, 3)
    torch.manual_seed(5)
    out = shake_drop(x, 0.5, training=True)
    out.backward(g)
    torch.manual_seed(5)
    gate = torch.rand(64, 1, 1, 1) < 0.5
    alpha = torch.rand(64, 1, 1, 1) * 2 - 1
    beta = torch.rand(64, 1, 1, 1)
    forward_scale = torch.where(gate, 1.0, alpha)
    backward_scale = torch.where(gate, 1.0, beta)
    assert torch.equal(out, forward_scale * x)
    assert torch.equal(x.grad, backward_scale * g)
    assert 0 < gate.sum() < 64
    assert (alpha[~gate] < 0).any() and (alpha[~gate] > 0).any()


def test_keep_probability_extremes() -> None:
    x = torch.randn(16, 3, 2, 2, requires_grad=True)
    g = torch.randn(16, 3, 2, 2)
    shake_drop(x, 1.0, training=True).backward(g)
    assert torch.equal(x.grad, g)
    torch.manual_seed(0)
    x.grad = None
    out = shake_drop(x, 0.0, training=True)
    out.backward(g)
    forward_scale = (out / x)[:, 0, 0, 0]
    backward_scale = (x.grad / g)[:, 0, 0, 0]
    assert (forward_scale.abs() <= 1 + 1e-6).all() and (forward_scale < 0).any()
    assert ((backward_scale >= 0) & (backward_scale <= 1 + 1e-6)).all()


def test_eval_scales_the_branch_by_its_expectation() -> None:
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(shake_drop(x, 0.75, training=False), 0.75 * x)
    torch.manual_seed(0)
    block = PyramidBottleneck(8, 4, stride=2, keep_prob=0.6)
    block.train()
    block(torch.randn(8, 8, 6, 6))  # non-trivial BatchNorm running statistics
    block.eval()
    x = torch.randn(3, 8, 6, 6)
    expected = 0.6 * block.branch(x) + block.shortcut(x)
    assert torch.equal(block(x), expected)


def test_shakedrop_network_is_random_in_training_only() -> None:
    torch.manual_seed(0)
    model = build_model("pyramidnet-20-8-shakedrop", 10, 1)
    x = torch.randn(4, 1, 8, 8)
    runs = {}
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.setdefault(seed, []).append(model(x))
    assert torch.equal(runs[1][0], runs[1][1])
    assert not torch.allclose(runs[1][0], runs[2][0])
    model.eval()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert torch.equal(first, model(x))


def test_plain_pyramidnet_has_no_randomness() -> None:
    torch.manual_seed(0)
    model = build_model("pyramidnet-20-8", 10, 1).train()
    x = torch.randn(4, 1, 8, 8)
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert torch.equal(first, model(x))
