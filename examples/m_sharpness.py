"""m-sharpness training (paper §4.1): one perturbation per subset of m examples, on one device.

    python examples/m_sharpness.py

Data-parallel SAM computes eps-hat on each accelerator from its own share of the batch (see ddp.py); the paper
finds that this smaller m generalises better than one eps-hat for the whole batch. ``opt.next_subset()`` gives
the same algorithm on one device, for any m:

    for i, (x_i, y_i) in enumerate(subsets):                 # subsets of m examples
        if i:
            opt.next_subset()                               # back to w; keep the perturbed gradients so far
        (criterion(model(x_i), y_i) * len(y_i) / n).backward()   # clean pass of this subset
        opt.first_step()                                    # eps_i from this subset's gradient alone
        (criterion(model(x_i), y_i) * len(y_i) / n).backward()   # perturbed pass, added to the sum
    opt.second_step()                                       # base step with the sum of the perturbed gradients

The script checks one such step against a float64 reference written from the definition, then trains a small
MLP on scikit-learn's digits with 40% noisy labels for m = 64 (the whole batch: plain SAM), 16 and 4, and prints
the test accuracy of each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

from sharpness import SAM

EPOCHS, BATCH, RHO = 20, 64, 0.1


def sam_step(model: nn.Module, opt: SAM, x: torch.Tensor, y: torch.Tensor, m: int) -> None:
    opt.zero_grad()
    for i, (xi, yi) in enumerate(zip(x.split(m), y.split(m), strict=True)):
        if i:
            opt.next_subset()
        (F.cross_entropy(model(xi), yi) * len(yi) / len(y)).backward()
        opt.first_step()
        (F.cross_entropy(model(xi), yi) * len(yi) / len(y)).backward()
    opt.second_step()


def reference_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, m: int) -> list[torch.Tensor]:
    """sum_i |S_i|/n * grad L_{S_i}(w + eps_i), eps_i = rho * g_i / ||g_i||, g_i = grad L_{S_i}(w)."""
    names, w = zip(*[(name, p.detach()) for name, p in model.named_parameters()], strict=True)

    def grad(values, xi, yi):
        leaves = [v.clone().requires_grad_() for v in values]
        out = functional_call(model, dict(zip(names, leaves, strict=True)), (xi,))
        return torch.autograd.grad(F.cross_entropy(out, yi), leaves)

    total = [torch.zeros_like(t) for t in w]
    for xi, yi in zip(x.split(m), y.split(m), strict=True):
        g = grad(w, xi, yi)
        norm = torch.cat([t.flatten() for t in g]).norm()
        for acc, h in zip(total, grad([t + RHO * gi / norm for t, gi in zip(w, g, strict=True)], xi, yi), strict=True):
            acc += h * len(yi) / len(y)
    return total


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def check_one_step() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(BATCH, 64, dtype=torch.float64), torch.randint(0, 10, (BATCH,))
    expected = reference_gradient(model, x, y, m=16)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    sam_step(model, opt, x, y, m=16)
    for p, b, want in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(b - p.detach(), want, rtol=1e-12, atol=1e-14)  # SGD, lr 1: w moved by -grad
    print("one step with m = 16 equals the float64 reference")


def main() -> None:
    check_one_step()
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    (x_train, y_train), (x_test, y_test) = (x[:1400], y[:1400].clone()), (x[1400:], y[1400:])
    gen = torch.Generator().manual_seed(1)
    noisy = torch.rand(len(y_train), generator=gen) < 0.4
    y_train[noisy] = (y_train[noisy] + torch.randint(1, 10, (int(noisy.sum()),), generator=gen)) % 10  # another class

    accuracies = {}
    for m in (BATCH, 16, 4):
        torch.manual_seed(0)
        model = mlp()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.05, momentum=0.9, weight_decay=5e-4)
        for epoch in range(EPOCHS):
            order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))
            for start in range(0, len(order) - BATCH + 1, BATCH):
                idx = order[start : start + BATCH]
                sam_step(model, opt, x_train[idx], y_train[idx], m)
        with torch.no_grad():
            accuracies[m] = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"m = {m:2d}: test accuracy {100 * accuracies[m]:.1f}% (40% noisy training labels)")
    assert all(a > 0.5 for a in accuracies.values())
    print(f"OK: m-sharpness steps match the reference; trained with m = {', '.join(map(str, accuracies))}")


if __name__ == "__main__":
    main()
