"""Tiny models, data and exact references (dense autograd Hessians) for the analysis tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def accuracy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x).argmax(dim=1) == y).float().mean()


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def make_bn_cnn() -> nn.Module:
    """Conv -> BatchNorm -> tanh -> linear; 210 parameters, running statistics made non-trivial."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(8, 2, 6, 6) * 1.5 + 0.3)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def make_batches(shape: tuple[int, ...], sizes: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


@dataclass
class Problem:
    model: nn.Module
    batches: list


@pytest.fixture
def mlp_problem() -> Problem:
    return Problem(make_mlp(), make_batches((6,), [8, 8, 5], seed=2))


@pytest.fixture
def bn_problem() -> Problem:
    return Problem(make_bn_cnn(), make_batches((2, 6, 6), [6, 6, 4], seed=3))


def set_mode(model: nn.Module, bn_mode: str) -> None:
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def dense_hessian(
    model: nn.Module, batches: list, bn_mode: str = "eval", names: list[str] | None = None
) -> torch.Tensor:
    """The float64 Hessian of sum_b (n_b/N) CE_b, by torch.autograd.functional.hessian on a copy.

    Independent of the library: it differentiates a function of one flat parameter vector, built
    with torch.func.functional_call, twice.
    """
    m = copy.deepcopy(model).double()
    set_mode(m, bn_mode)
    named = dict(m.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if names is None else names
    shapes = [named[n].shape for n in names]
    numels = [named[n].numel() for n in names]
    flat0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    data = [(x.double(), y) for x, y in batches]
    total = sum(x.shape[0] for x, _ in data)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        state = {k: v.detach() for k, v in m.named_parameters()}
        state.update({k: b.clone() for k, b in m.named_buffers()})
        for n, t, s in zip(names, torch.split(flat, numels), shapes, strict=True):
            state[n] = t.view(s)
        out = flat.new_zeros(())
        for x, y in data:
            out = out + x.shape[0] / total * F.cross_entropy(functional_call(m, state, (x,)), y)
        return out

    return torch.autograd.functional.hessian(loss, flat0)


def state_copy(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def assert_state_equal(model: nn.Module, before: dict) -> None:
    """Parameters and buffers bit-identical (same dtype), flags and grads unchanged."""
    now = model.state_dict(keep_vars=True)
    assert now.keys() == before["tensors"].keys()
    for k, t in now.items():
        ref = before["tensors"][k]
        assert t.dtype == ref.dtype, k
        assert torch.equal(t.detach(), ref), k
    assert [m.training for m in model.modules()] == before["training"]
    for p, g in zip(model.parameters(), before["grads"], strict=True):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(p.grad, g)
