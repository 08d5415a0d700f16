"""The explicit two-pass loop: ``first_step()``, a second forward/backward, ``second_step()``.

    python examples/two_pass_loop.py

Use it when a closure is awkward (custom loops, several losses, logging both losses). Per batch:

    loss = criterion(model(x), y); loss.backward()        # clean pass at w
    opt.first_step(zero_grad=True)                        # w -> w + eps-hat; clears .grad for the next pass
    criterion(model(x), y).backward()                     # perturbed pass at w + eps-hat
    opt.second_step(zero_grad=True)                       # restore w, base step with the perturbed gradient

It is bit-identical to ``opt.step(closure)`` (checked below). As a by-product it gives L(w + eps-hat) - L(w),
the first-order sharpness of the batch, for free.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sharpness import SAM

EPOCHS, BATCH = 4, 64


def digits(seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # flattened 8x8 images
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))


def make_opt(model: nn.Module) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=0.1, model=model, lr=0.1, momentum=0.9)


def main() -> None:
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = digits()

    # 1. The two forms are the same algorithm: one step each from the same weights gives the same weights.
    a = mlp()
    b = copy.deepcopy(a)
    opt_a, opt_b = make_opt(a), make_opt(b)
    x, y = x_train[:BATCH], y_train[:BATCH]

    def closure():
        loss = F.cross_entropy(a(x), y)
        loss.backward()
        return loss

    opt_a.step(closure)
    F.cross_entropy(b(x), y).backward()
    opt_b.first_step(zero_grad=True)
    F.cross_entropy(b(x), y).backward()
    opt_b.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    print("closure form and two-pass form: bit-identical weights and buffers after one step")

    # 2. A training loop in the two-pass form, logging the loss at w and at w + eps-hat.
    model = mlp()
    opt = make_opt(model)
    sharpness_per_epoch = []
    for epoch in range(EPOCHS):
        clean_sum = perturbed_sum = 0.0
        for idx in torch.randperm(len(y_train)).split(BATCH):
            x, y = x_train[idx], y_train[idx]
            loss = F.cross_entropy(model(x), y)  # clean pass at w
            loss.backward()
            opt.first_step(zero_grad=True)  # the perturbed backward must not add to the clean gradient

            perturbed_loss = F.cross_entropy(model(x), y)  # perturbed pass at w + eps-hat
            perturbed_loss.backward()
            opt.second_step(zero_grad=True)  # back to w, then SGD with the gradient taken at w + eps-hat

            clean_sum += loss.item() * len(idx)
            perturbed_sum += perturbed_loss.item() * len(idx)
        clean, perturbed = clean_sum / len(y_train), perturbed_sum / len(y_train)
        sharpness_per_epoch.append(perturbed - clean)
        print(f"epoch {epoch + 1}: L(w) {clean:.4f}  L(w + eps) {perturbed:.4f}  sharpness {perturbed - clean:.4f}")

    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    # Stepping by rho along the gradient raises the loss (first-order ascent): the sharpness estimate is positive.
    assert all(s > 0 for s in sharpness_per_epoch), sharpness_per_epoch
    assert acc > 0.9, f"test accuracy {acc:.3f} is too low"
    print(f"OK: two-pass loop reached {acc:.1%} test accuracy")


if __name__ == "__main__":
    main()
