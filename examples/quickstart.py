"""Quickstart: SAM in its closure form, training a small CNN with BatchNorm on scikit-learn's digits.

    python examples/quickstart.py

``opt.step(closure)`` runs the closure twice: at w (the clean pass, whose gradient gives eps-hat, eq. 2 of the
paper) and at w + eps-hat (the perturbed pass, whose gradient the base optimizer applies to w, eq. 3). It returns
the loss at w. ``model=model`` makes the BatchNorm running statistics end the step as the clean pass left them.
An LR scheduler is built on the SAM optimizer itself: SAM and its base optimizer share their param groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sharpness import SAM

EPOCHS, BATCH = 5, 64


def digits(seed: int = 0):
    """8x8 grey images of the digits 0-9 (1797 of them), split 1400 train / 397 test."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train_step(model: nn.Module, opt: SAM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def closure():
        # forward + backward, returning the loss; SAM clears the gradients between its two calls.
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad()  # step() leaves the perturbed pass's gradients in .grad, as optimizers do
    return opt.step(closure)  # the loss at w (the clean pass)


def main() -> None:
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = digits()
    model = cnn()

    # SAM wraps any torch.optim optimizer: pass the class and its options (or an instance built on the same params).
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = -(-len(y_train) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * steps_per_epoch)

    for epoch in range(EPOCHS):
        total = 0.0
        for idx in torch.randperm(len(y_train)).split(BATCH):
            loss = train_step(model, opt, x_train[idx], y_train[idx])
            sched.step()
            total += loss.item() * len(idx)
        print(
            f"epoch {epoch + 1}: train loss {total / len(y_train):.4f}  lr {opt.param_groups[0]['lr']:.4f}  "
            f"test accuracy {accuracy(model, x_test, y_test):.3f}"
        )

    acc = accuracy(model, x_test, y_test)
    # The scheduler drove the base optimizer's learning rate (one set of param groups for both).
    assert opt.base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 1e-3
    assert acc > 0.9, f"test accuracy {acc:.3f} is too low"
    print(f"OK: SAM + SGD + cosine schedule reached {acc:.1%} test accuracy on digits")


if __name__ == "__main__":
    main()
