from __future__ import annotations

import pytest
import torch
from torch import nn


class Recorder(torch.optim.Optimizer):
    """A base optimizer that records the gradients it is handed and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.seen: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])


def mlp(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )


def batch(n: int = 16, dtype=torch.float64, seed: int = 1, image: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 2, 5, 5) if image else (n, 5), generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


@pytest.fixture
def recorder_cls():
    return Recorder
