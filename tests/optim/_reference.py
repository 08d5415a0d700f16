"""Float64 references for the variants' tests: gradients of a model at given weights, vector algebra on flat
vectors, and torch's SGD written out. Nothing here imports the optimizers under test."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .conftest import batch, bn_net, mlp

LR, MOMENTUM, WD = 0.1, 0.9, 5e-4


class Model:
    """A float64 copy of ``module`` evaluated at flat weight vectors; BatchNorm statistics in ``buffers``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = copy.deepcopy(module).double().train()
        self.names = [n for n, _ in self.module.named_parameters()]
        self.shapes = [p.shape for _, p in self.module.named_parameters()]
        self.buffers = {n: b.clone() for n, b in self.module.named_buffers()}

    def flat(self, module: nn.Module) -> Tensor:
        return torch.cat([p.detach().double().flatten() for p in module.parameters()])

    def split(self, w: Tensor) -> list[Tensor]:
        out, i = [], 0
        for shape in self.shapes:
            n = int(torch.Size(shape).numel())
            out.append(w[i : i + n].view(shape))
            i += n
        return out

    def losses(self, w: Tensor, x: Tensor, y: Tensor, update_buffers: bool = False) -> Tensor:
        """Per-example losses at ``w``; BatchNorm's running statistics move only with ``update_buffers``."""
        buffers = self.buffers if update_buffers else {n: b.clone() for n, b in self.buffers.items()}
        params = dict(zip(self.names, self.split(w), strict=True))
        return F.cross_entropy(functional_call(self.module, {**params, **buffers}, (x.double(),)), y, reduction="none")

    def grad(self, w: Tensor, x: Tensor, y: Tensor, update_buffers: bool = False) -> Tensor:
        w = w.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(self.losses(w, x, y, update_buffers).mean(), w)
        return g


class SGD:
    """torch.optim.SGD(lr, momentum, weight_decay) on a flat vector (dampening 0, not Nesterov)."""

    def __init__(self, lr: float = LR, momentum: float = MOMENTUM, weight_decay: float = WD) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buf: Tensor | None = None

    def step(self, w: Tensor, g: Tensor) -> Tensor:
        d = g + self.weight_decay * w
        self.buf = d.clone() if self.buf is None else self.momentum * self.buf + d
        return w - self.lr * self.buf


def unit(v: Tensor) -> Tensor:
    return v / v.norm()


def orthogonal(a: Tensor, b: Tensor) -> Tensor:
    """The component of ``a`` orthogonal to ``b``."""
    return a - (a @ b) / (b @ b) * b


def models(name: str) -> nn.Module:
    return mlp() if name == "mlp" else bn_net().double()


def batches(name: str, steps: int, n: int = 16) -> list[tuple[Tensor, Tensor]]:
    return [batch(n, torch.float64, seed=100 + s, image=name == "bn") for s in range(steps)]


def flat_params(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def closure_for(module: nn.Module, x: Tensor, y: Tensor, counter: list[int] | None = None):
    def closure():
        if counter is not None:
            counter[0] += 1
        module.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        return loss

    return closure


def assert_matches(module: nn.Module, w: Tensor, ref: Model) -> None:
    """The module's weights equal the reference's ``w`` and its buffers the reference's clean-pass statistics."""
    torch.testing.assert_close(flat_params(module), w, rtol=1e-10, atol=1e-12)
    for name, buffer in module.named_buffers():
        torch.testing.assert_close(buffer, ref.buffers[name], rtol=1e-10, atol=1e-12)
