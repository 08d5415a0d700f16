"""Gradient accumulation with SAM: the same step as one big batch, computed in micro-batches.

    python examples/grad_accumulation.py

eps-hat must come from the gradient of the WHOLE batch, so both passes are accumulated, each over the same
micro-batches:

    for x, y in micro_batches:                          # clean pass at w, accumulated
        (criterion(model(x), y) * len(y) / n).backward()
    opt.first_step(zero_grad=True)                      # one perturbation, from the full-batch gradient
    for x, y in micro_batches:                          # perturbed pass at w + eps-hat, accumulated
        (criterion(model(x), y) * len(y) / n).backward()
    opt.second_step(zero_grad=True)

Calling ``first_step()`` per micro-batch instead would perturb with each micro-batch's gradient: a different (and
k times as expensive) algorithm. Weighting each mean loss by len(y) / n makes unequal micro-batches exact.
Under DDP, run all clean-pass micro-batches and all but the last perturbed one under ``model.no_sync()``.
Layers whose forward depends on the batch (BatchNorm) make any accumulation differ from the big batch, SAM or
not, so this check uses an MLP without them, in float64 to compare tightly.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sharpness import SAM

STEPS, BATCH, MICRO = 8, 100, 32  # micro-batches of 32, 32, 32 and 4


def make_opt(model: nn.Module) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


def full_batch_step(model, opt, x, y) -> None:
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad()
    opt.step(closure)


def accumulated_step(model, opt, x, y) -> None:
    micro_batches = list(zip(x.split(MICRO), y.split(MICRO), strict=True))
    n = len(y)
    for xi, yi in micro_batches:  # clean pass
        (F.cross_entropy(model(xi), yi) * len(yi) / n).backward()
    opt.first_step(zero_grad=True)
    for xi, yi in micro_batches:  # perturbed pass, same micro-batches
        (F.cross_entropy(model(xi), yi) * len(yi) / n).backward()
    opt.second_step(zero_grad=True)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(STEPS * BATCH, 20, generator=gen, dtype=torch.float64)
    y_all = (x_all @ torch.randn(20, 5, generator=gen, dtype=torch.float64)).argmax(1)  # a random linear teacher

    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).double()
    accumulated = copy.deepcopy(full)
    opt_full, opt_acc = make_opt(full), make_opt(accumulated)

    for step in range(STEPS):
        x, y = x_all[step * BATCH : (step + 1) * BATCH], y_all[step * BATCH : (step + 1) * BATCH]
        full_batch_step(full, opt_full, x, y)
        accumulated_step(accumulated, opt_acc, x, y)
        pairs = zip(full.parameters(), accumulated.parameters(), strict=True)
        diff = max((a - b).abs().max().item() for a, b in pairs)
        print(f"step {step + 1}: max |w_full - w_accumulated| = {diff:.1e}")

    for a, b in zip(full.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    for key, state in opt_full.state_dict()["base_optimizer"]["state"].items():
        acc_state = opt_acc.state_dict()["base_optimizer"]["state"][key]
        torch.testing.assert_close(state["momentum_buffer"], acc_state["momentum_buffer"], rtol=1e-12, atol=1e-13)
    print(f"OK: {STEPS} SAM steps accumulated over micro-batches of {MICRO} equal the full-batch steps of {BATCH}")


if __name__ == "__main__":
    main()
