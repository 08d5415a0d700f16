"""SAM under a trainer that calls ``optimizer.step()`` itself (Hugging Face ``Trainer``, Lightning, ...).

    python examples/trainer_style_step.py

Trainers own the loop: per batch they call a user hook that does forward + backward, then maybe clip, then
``optimizer.step()`` (or ``scaler.step(optimizer)`` under fp16) with no closure. SAM fits that sequence: the hook
does both passes and calls ``first_step()`` in between; the trainer's plain ``step()`` then finishes the SAM step
(restore w, base step), exactly like ``second_step()``. A bare ``step()`` with neither a closure nor a pending
``first_step()`` raises instead of silently taking a plain, non-SAM step.

This script emulates the call sequence with a tiny ``MiniTrainer`` (neither transformers nor lightning is needed).
Where the hooks are in the real frameworks:

* Hugging Face ``Trainer``: pass ``optimizers=(sam, scheduler)`` and override ``Trainer.training_step``:
  ``loss = self.compute_loss(model, inputs)``, ``self.accelerator.backward(loss)``, ``sam.first_step()``, a second
  ``compute_loss`` + ``accelerator.backward``, return ``loss.detach()``. The Trainer then clips
  (``accelerator.clip_grad_norm_``, which unscales first under fp16) and calls ``self.optimizer.step()``, which
  accelerate's ``AcceleratedOptimizer`` turns into ``sam.step()`` or ``scaler.step(sam)``. Call ``first_step()`` on
  your own reference to ``sam`` (or ``self.optimizer.optimizer``), not on that wrapper. The override assumes
  ``gradient_accumulation_steps=1`` (the hook runs once per micro-batch); to accumulate, see
  ``examples/grad_accumulation.py``.
* Lightning, ``precision="32"`` with automatic optimization and ``accumulate_grad_batches=1``: nothing to do.
  Lightning calls ``optimizer.step(closure=...)`` with a closure that zeroes the gradients, runs ``training_step``
  and the backward and returns the loss: SAM's closure form (``training_step`` runs twice per batch).
* Lightning, ``precision="16-mixed"``: the precision plugin runs the closure once itself and then calls
  ``scaler.step(optimizer)`` without a closure, so use manual optimization (``self.automatic_optimization =
  False``) and in ``training_step``: ``opt = self.optimizers()``, ``sam = opt.optimizer``,
  ``self.manual_backward(loss)``, ``sam.first_step()``, ``self.manual_backward(loss2)``, ``opt.step()``. Clip with
  ``SAM(..., max_grad_norm=...)``: Lightning refuses ``gradient_clip_val`` for optimizers that unscale in their
  own step (``_step_supports_amp_scaling``). With manual optimization in fp32, ``opt.step()`` passes a do-nothing
  closure, which SAM rejects mid-step: call ``opt.step(closure=closure)`` (closure form) or ``sam.second_step()``.
* Call ``first_step()`` on the SAM object itself, never on a wrapper: section 4 shows why.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sharpness import SAM

STEPS, BATCH, CLIP = 30, 64, 1.0


def digits_batches(seed: int = 0):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[i], y[i]) for i in perm.split(BATCH)][:STEPS]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def make_sam(model: nn.Module, **kwargs) -> SAM:
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9, **kwargs)


class MiniTrainer:
    """The per-batch call sequence of Hugging Face's Trainer (through accelerate) and of Lightning's AMP plugin."""

    def __init__(self, model, optimizer, scheduler, scaler=None, max_grad_norm=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler, self.max_grad_norm = scaler, max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:  # accelerator.backward / LightningModule.manual_backward
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def training_step(self, model, batch) -> torch.Tensor:  # the user hook; by default one forward + backward
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        self.backward(loss)
        return loss.detach()

    def fit(self, batches) -> list[float]:
        losses = []
        for batch in batches:
            losses.append(self.training_step(self.model, batch).item())
            if self.max_grad_norm is not None:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # -> SAM.step() with no closure
                self.scaler.update()
            else:
                self.optimizer.step()  # no closure: the trainer does not know about SAM
            self.scheduler.step()
            self.optimizer.zero_grad()
        return losses


class SAMTrainer(MiniTrainer):
    """What the user writes: override the hook, do both passes, call ``first_step()`` in between."""

    def __init__(self, model, sam: SAM, **kwargs):
        super().__init__(model, sam, **kwargs)
        self.sam = sam  # our own reference to the SAM object (a real trainer may wrap self.optimizer)

    def training_step(self, model, batch) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        self.backward(loss)  # clean pass at w (scaled under fp16: eps-hat does not care)
        self.sam.first_step(zero_grad=True)  # w -> w + eps-hat
        self.backward(F.cross_entropy(model(x), y))  # perturbed pass; the trainer's step() finishes the SAM step
        return loss


def make_closure(model, x, y):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def reference_run(batches) -> nn.Module:
    """The plain closure-form loop, clipping with SAM's own option, for comparison."""
    model = mlp()
    opt = make_sam(model, max_grad_norm=CLIP)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    for x, y in batches:
        opt.zero_grad()
        opt.step(make_closure(model, x, y))
        sched.step()
    return model


def max_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((p - q).abs().max().item() for p, q in pairs)


def main() -> None:
    batches = digits_batches()
    reference = reference_run(batches)

    # 1. fp32: the trainer clips, then calls optimizer.step().
    model = mlp()
    sam = make_sam(model)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=10, gamma=0.5)
    losses = SAMTrainer(model, sam, scheduler=sched, max_grad_norm=CLIP).fit(batches)
    diff = max_diff(model, reference)
    print(f"fp32 trainer:   loss {losses[0]:.3f} -> {losses[-1]:.3f}, max |w - w_closure_form| = {diff:.1e}")
    assert losses[-1] < losses[0] / 2
    assert diff < 1e-5, diff  # same algorithm (a tolerance, as the two clipping calls may round differently)

    # 2. With a GradScaler: the trainer calls scaler.unscale_ (to clip) and scaler.step(optimizer).
    model = mlp()
    sam = make_sam(model)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=10, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")  # fp32 compute here; add torch.autocast for real fp16 training
    losses = SAMTrainer(model, sam, scheduler=sched, scaler=scaler, max_grad_norm=CLIP).fit(batches)
    diff = max_diff(model, reference)
    print(f"scaler trainer: loss {losses[0]:.3f} -> {losses[-1]:.3f}, max |w - w_closure_form| = {diff:.1e}")
    assert int(sam.skipped_steps) == 0 and diff < 1e-5, diff  # a power-of-two scale unscales exactly

    # 3. The trainer's loop with the default hook (one backward, no first_step): SAM refuses to take a plain step.
    model = mlp()
    sam = make_sam(model)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=10)
    before = copy.deepcopy(dict(model.named_parameters()))
    try:
        MiniTrainer(model, sam, sched).fit(batches[:1])
    except RuntimeError as err:
        print(f"bare step():    RuntimeError: {err}")
    else:
        raise AssertionError("a bare SAM.step() must raise")
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())  # no step was taken

    # 4. Wrappers. Lightning 2.x wraps optimizers in a LightningOptimizer whose class subclasses the optimizer's
    # class and forwards attribute reads (__getattr__), so self.optimizers().first_step() runs SAM's method with
    # self = the wrapper. SAM keeps its step bookkeeping in one object that is mutated in place, never
    # reassigned, so the real optimizer sees the step in progress. Emulated here.
    class Wrapper:
        def __init__(self, optimizer):
            self._optimizer = optimizer
            self.__class__ = type("Wrapped" + type(optimizer).__name__, (Wrapper, type(optimizer)), {})

        def __getattr__(self, item):
            return getattr(self._optimizer, item)

    model = mlp()
    sam = make_sam(model)
    wrapped = Wrapper(sam)
    x, y = batches[0]
    before = copy.deepcopy(dict(model.named_parameters()))
    F.cross_entropy(model(x), y).backward()
    wrapped.first_step()  # through the wrapper, as in a LightningModule
    F.cross_entropy(model(x), y).backward()
    sam.step()  # what the trainer calls on the real optimizer: finishes the SAM step
    assert not any(torch.equal(before[name], p) for name, p in model.named_parameters())
    print("wrapper:        first_step() through a forwarding wrapper, step() on the real SAM: one SAM step")

    print("OK: a trainer calling optimizer.step() / scaler.step(optimizer) after the hook's first_step() runs SAM")


if __name__ == "__main__":
    main()
