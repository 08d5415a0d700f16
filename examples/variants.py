"""Every SAM variant in one training loop: the same manual step serves all of them, also under fp16 GradScaler.

    python examples/variants.py

Three forms cover every variant (each documented in docs/variants.md):

    # SAM, GSAM, FriendlySAM, VaSSO, and the scheduled ones (LookSAM, IntervalSAM, StochasticSAM, AESAM):
    scaler.scale(loss_fn(model(x), y)).backward()
    if opt.first_step():                    # False on a step that does not ascend: one pass only
        scaler.scale(loss_fn(model(x), y)).backward()
    scaler.step(opt); scaler.update()

    # MSAM and RandomDirectionSAM perturb before their only pass:
    opt.first_step()
    scaler.scale(loss_fn(model(x), y)).backward()
    scaler.step(opt); scaler.update()

    # ESAM: per-example losses, a forward at w + eps without backward, then the sharpest examples:
    losses = loss_fn(model(x), y, reduction="none"); scaler.scale(losses.mean()).backward()
    opt.first_step()
    with torch.no_grad(): sharper = loss_fn(model(x), y, reduction="none")
    keep = opt.select(losses.detach(), sharper)
    scaler.scale(loss_fn(model(x[keep]), y[keep])).backward()
    scaler.step(opt); scaler.update()

Variants that read the clean gradient's size (FriendlySAM, VaSSO, AESAM) take ``grad_scaler=scaler``. The
script trains each variant for two epochs on scikit-learn's digits with fp16 autocast and a GradScaler where
the device supports it (bf16 on CPU otherwise), and checks that every one of them learns and takes the number
of passes it promises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import sharpness

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AMP = torch.float16 if DEVICE == "cuda" else torch.bfloat16
EPOCHS, BATCH = 2, 64

VARIANTS = {
    "SAM": (sharpness.SAM, {}),
    "GSAM": (sharpness.GSAM, {"alpha": 0.4}),
    "LookSAM": (sharpness.LookSAM, {"k": 5, "alpha": 0.7}),
    "MSAM": (sharpness.MSAM, {"rho": 0.3}),
    "ESAM": (sharpness.ESAM, {"beta": 0.5, "gamma": 0.5}),
    "FriendlySAM": (sharpness.FriendlySAM, {"sigma": 1.0, "lmbda": 0.9}),
    "VaSSO": (sharpness.VaSSO, {"theta": 0.9}),
    "IntervalSAM": (sharpness.IntervalSAM, {"k": 2}),
    "StochasticSAM": (sharpness.StochasticSAM, {"probability": 0.5}),
    "AESAM": (sharpness.AESAM, {"c_start": 0.0}),
    "RandomDirectionSAM": (sharpness.RandomDirectionSAM, {}),
}


def digits():
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1).to(DEVICE) / 16.0
    y = torch.tensor(data.target).to(DEVICE)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return (x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)
    ).to(DEVICE)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    with torch.autocast(DEVICE, dtype=AMP):
        logits = model(x)
    return F.cross_entropy(logits.float(), y, reduction=reduction)


def train_step(opt, model, x, y, scaler: torch.amp.GradScaler | None) -> int:
    """One step of any variant; returns the number of backward passes it took."""

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    opt.zero_grad(set_to_none=True)
    if opt.perturbs_before_pass:
        opt.first_step()
        backward(loss_fn(model, x, y))
        passes = 1
    elif isinstance(opt, sharpness.ESAM):
        losses = loss_fn(model, x, y, reduction="none")
        backward(losses.mean())
        opt.first_step()
        with torch.no_grad():
            sharper = loss_fn(model, x, y, reduction="none")
        keep = opt.select(losses.detach(), sharper)
        backward(loss_fn(model, x[keep], y[keep]))
        passes = 2
    else:
        backward(loss_fn(model, x, y))
        passes = 1
        if opt.first_step():
            backward(loss_fn(model, x, y))
            passes = 2
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return passes


def main() -> None:
    (x, y), (x_test, y_test) = digits()
    steps = EPOCHS * (len(y) // BATCH)
    print(f"{'variant':19s} {'passes/step':>11s} {'test error %':>12s}")
    for name, (cls, options) in VARIANTS.items():
        model = net()
        scaler = torch.amp.GradScaler(DEVICE) if AMP == torch.float16 else None
        options = {"rho": 0.05, **options}
        if cls is sharpness.AESAM:
            options["total_steps"] = steps
        opt = cls(
            model.parameters(), torch.optim.SGD, model=model, grad_scaler=scaler, lr=0.05, momentum=0.9, **options
        )
        passes = 0
        for epoch in range(EPOCHS):
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).to(DEVICE)
            for i in range(len(y) // BATCH):
                idx = order[i * BATCH : (i + 1) * BATCH]
                passes += train_step(opt, model, x[idx], y[idx], scaler)
        model.eval()
        with torch.no_grad():
            error = 100.0 * float((model(x_test).argmax(1) != y_test).float().mean())
        print(f"{name:19s} {passes / steps:11.2f} {error:12.2f}")
        assert error < 20.0, f"{name} did not learn: {error:.1f}% test error"
        expected = {"LookSAM": 1.2, "MSAM": 1.0, "RandomDirectionSAM": 1.0, "IntervalSAM": 1.5}.get(name)
        if expected is not None:
            assert abs(passes / steps - expected) < 0.05, (name, passes / steps)
    print("OK: every variant trains in the one loop above")


if __name__ == "__main__":
    main()
