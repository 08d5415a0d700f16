"""BatchNorm and SAM: ``model=`` leaves the running statistics exactly as the clean pass left them.

    python examples/batchnorm.py

A SAM step runs two forwards in train mode. The second one, at w + eps-hat, would update BatchNorm's running
mean/var a second time (with statistics of the perturbed network) and count the batch twice in
``num_batches_tracked``. ``SAM(..., model=model)`` copies every buffer of the model before the perturbation and
puts it back when it restores w, so after each step the buffers are bit-identical to "one clean forward at w".
Without ``model=`` the perturbed pass leaves its mark. (Other implementations switch BatchNorm's momentum to 0 for
the second pass, which does not undo ``num_batches_tracked`` nor cover other stateful modules.)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sharpness import SAM

STEPS, BATCH = 5, 64


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )  # fmt: skip


def sam_step(model, opt, x, y) -> None:
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad()
    opt.step(closure)


def main() -> None:
    gen = torch.Generator().manual_seed(0)  # synthetic 8x8 images and labels
    images = torch.randn(STEPS, BATCH, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (STEPS, BATCH), generator=gen)
    batches = list(zip(images, labels, strict=True))

    with_model, without_model = cnn(), cnn()
    opt_with = SAM(with_model.parameters(), torch.optim.SGD, rho=0.5, model=with_model, lr=0.1, momentum=0.9)
    opt_without = SAM(without_model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)

    for step, (x, y) in enumerate(batches):
        # What the buffers must be after this step: the current model after one clean forward in train mode.
        expected = copy.deepcopy(with_model)
        expected(x)

        sam_step(with_model, opt_with, x, y)
        sam_step(without_model, opt_without, x, y)

        bn_with, bn_without, bn_expected = with_model[1], without_model[1], expected[1]
        assert all(torch.equal(a, b) for a, b in zip(expected.buffers(), with_model.buffers(), strict=True))
        print(
            f"step {step + 1}: num_batches_tracked with model= {bn_with.num_batches_tracked.item()}, "
            f"without {bn_without.num_batches_tracked.item()};  "
            f"|running_mean - clean| with model= {(bn_with.running_mean - bn_expected.running_mean).abs().max():.1e}"
        )

    bn_with, bn_without = with_model[1], without_model[1]
    assert bn_with.num_batches_tracked.item() == STEPS
    assert bn_without.num_batches_tracked.item() == 2 * STEPS  # every batch counted twice

    # After the first step both models still have the same weights: compare the statistics themselves.
    a, b = cnn(), cnn()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.5, model=a, lr=0.1)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    clean = cnn()
    clean(batches[0][0])
    sam_step(a, opt_a, *batches[0])
    sam_step(b, opt_b, *batches[0])
    gap_a = (a[1].running_mean - clean[1].running_mean).abs().max().item()
    gap_b = (b[1].running_mean - clean[1].running_mean).abs().max().item()
    print(f"one step: running_mean off the clean pass's by {gap_a:.1e} with model=, by {gap_b:.1e} without")
    assert gap_a == 0.0 and gap_b > 0.0
    print("OK: with model= BatchNorm buffers end every SAM step exactly as after the clean pass alone")


if __name__ == "__main__":
    main()
