"""Mixed precision: fp16 autocast with ``torch.amp.GradScaler`` (clipping, skipped steps), and bf16 without a scaler.

    python examples/amp_grad_scaler.py

The fp16 recipe, per batch:

    with torch.autocast(device, dtype=torch.float16):
        loss = criterion(model(x), y)
    scaler.scale(loss).backward()
    opt.first_step(zero_grad=True)        # no unscale_ here: eps-hat = rho g / ||g|| ignores the loss scale
    with torch.autocast(device, dtype=torch.float16):
        loss2 = criterion(model(x), y)
    scaler.scale(loss2).backward()
    scaler.unscale_(opt)                  # optional, only to clip or inspect the true gradient ...
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # ... (or SAM(..., max_grad_norm=1.0) instead)
    scaler.step(opt)                      # calls SAM's step(): unscales (if not done yet), restores w,
    scaler.update()                       # skips the base step if either pass had an inf/NaN gradient

SAM sets ``_step_supports_amp_scaling``, so ``scaler.step`` hands it the scale and the inf flag instead of
unscaling itself. Hence no "unscale_() has already been called on this optimizer" error when you clip, and no
NaN from a norm taken over overflowing scaled gradients in the first pass: an inf there skips the step too.

On a GPU the code is the same with device = "cuda": ``torch.autocast("cuda", dtype=torch.float16)`` and
``torch.amp.GradScaler("cuda")`` (this script picks CUDA when it is available). With an unfused base optimizer
the skip decision reads one flag on the host per step; ``fused=True`` base optimizers skip on the device.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sharpness import SAM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPOCHS, BATCH, CLIP = 2, 64, 1.0


def digits(seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm].to(DEVICE), y[perm].to(DEVICE)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128, 10),
    ).to(DEVICE)  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def fp16_step(model, opt, scaler, x, y, poison: bool = False) -> torch.Tensor:
    """One SAM step under fp16 autocast and a GradScaler; ``poison`` fakes an fp16 overflow in the second pass."""
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()  # clean pass: scaled gradients
    opt.first_step(zero_grad=True)  # no unscale_ needed: eps-hat ignores the loss scale

    with torch.autocast(DEVICE, dtype=torch.float16):
        loss2 = F.cross_entropy(model(x), y)
    scaler.scale(loss2).backward()  # perturbed pass
    if poison:
        model[0].weight.grad[0, 0, 0, 0] = float("inf")  # what an overflow in the backward pass looks like

    scaler.unscale_(opt)  # to clip the true gradient; scaler.step will not unscale again
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    scaler.step(opt)  # SAM.step(): restore w, base step unless either pass had an inf/NaN gradient
    scaler.update()  # backs the scale off after a skipped step
    opt.zero_grad()
    return loss


def bf16_step(model, opt, x, y) -> torch.Tensor:
    """One SAM step under bf16 autocast: the closure form, no scaler."""

    def closure():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()  # backward outside autocast, as usual
        return loss

    opt.zero_grad()
    return opt.step(closure)


def main() -> None:
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = digits()

    # ---- fp16 autocast + GradScaler, with gradient clipping --------------------------------------------------
    model = cnn()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(DEVICE)
    for epoch in range(EPOCHS):
        for idx in torch.randperm(len(y_train), device=DEVICE).split(BATCH):
            loss = fp16_step(model, opt, scaler, x_train[idx], y_train[idx])
        print(
            f"fp16 epoch {epoch + 1}: last loss {loss.item():.4f}  scale {scaler.get_scale():.0f}  "
            f"skipped steps so far {int(opt.skipped_steps)}  test accuracy {accuracy(model, x_test, y_test):.3f}"
        )
    acc16 = accuracy(model, x_test, y_test)
    assert acc16 > 0.9, f"fp16 test accuracy {acc16:.3f} is too low"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps float32 master weights

    # ---- a poisoned step: skipped, reported, weights and momentum untouched ----------------------------------
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    momentum_before = copy.deepcopy(opt.state_dict()["base_optimizer"]["state"])
    skipped_before, scale_before = int(opt.skipped_steps), scaler.get_scale()

    fp16_step(model, opt, scaler, x_train[:BATCH], y_train[:BATCH], poison=True)

    assert bool(opt.last_step_skipped) and int(opt.skipped_steps) == skipped_before + 1
    assert scaler.get_scale() == scale_before / 2  # the scaler saw the inf and backed off
    # w is restored exactly (not left at w + eps-hat) and the base optimizer did not run. (BatchNorm statistics
    # do move: the clean pass of the skipped step ran, as it would without SAM.)
    assert all(torch.equal(p, params_before[name]) for name, p in model.named_parameters())
    for key, state in opt.state_dict()["base_optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], momentum_before[key]["momentum_buffer"])
    print(
        f"poisoned step: last_step_skipped={bool(opt.last_step_skipped)}  skipped_steps={int(opt.skipped_steps)}  "
        f"scale {scale_before:.0f} -> {scaler.get_scale():.0f}  weights and momentum unchanged"
    )

    fp16_step(model, opt, scaler, x_train[:BATCH], y_train[:BATCH])  # and training goes on
    assert not bool(opt.last_step_skipped)

    # ---- bf16 autocast: same exponent range as float32, so no scaler; the closure form works as is ----------
    torch.manual_seed(0)
    model = cnn()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(y_train), device=DEVICE).split(BATCH):
            bf16_step(model, opt, x_train[idx], y_train[idx])
    acc_bf16 = accuracy(model, x_test, y_test)
    print(f"bf16: test accuracy {acc_bf16:.3f}  (skipped steps {int(opt.skipped_steps)})")
    assert acc_bf16 > 0.9, f"bf16 test accuracy {acc_bf16:.3f} is too low"
    print(f"OK: fp16 + GradScaler reached {acc16:.1%}, bf16 reached {acc_bf16:.1%}; the inf step was skipped")


if __name__ == "__main__":
    main()
