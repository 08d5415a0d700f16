"""SAM's options, each checked on one step: ASAM, p = inf, per-group rho, ascent_steps, second_order; checkpoints.

    python examples/asam_and_options.py

Every check runs one step with a closure that records the weights it is called at, so eps-hat is visible:
the first call is at w, the second at w + eps-hat.

* ``adaptive=True`` (ASAM, Kwon et al. 2021): the ball is scale-invariant, ||eps / (|w| + eta)||_2 = rho.
  ASAM uses a larger rho than SAM (its paper: 0.5 to 2 for SGD on CIFAR).
* ``p=math.inf``: eps-hat = rho * sign(g), every coordinate (with a nonzero gradient) moved by rho.
* per-group ``rho``: a group with ``rho=0`` is neither perturbed nor part of the norm (e.g. perturb only the head).
* ``ascent_steps=2``: two ascent steps of radius rho/2 (three closure calls), still inside the ball.
* ``second_order=True``: adds the term the paper drops (Appendix C.4) through a third pass with
  ``loss.backward(create_graph=opt.create_graph)``: the update is the exact gradient of L(w + eps-hat(w)).
* ``opt.state_dict()`` holds the base optimizer's state (momentum) and SAM's counters; it loads with
  ``torch.load(..., weights_only=True)`` and training resumes bit-identically.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sharpness import SAM


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).double()


def probe(model: nn.Module, opt: SAM, x, y) -> list[list[torch.Tensor]]:
    """One SAM step; returns the weights at each closure call."""
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=opt.create_graph)  # create_graph is True only in second_order's third pass
        return loss

    opt.zero_grad()
    opt.step(closure)
    return seen


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 20, generator=gen, dtype=torch.float64)
    y = (x @ torch.randn(20, 5, generator=gen, dtype=torch.float64)).argmax(1)  # labels of a random linear teacher
    rho = 0.05

    # ---- SAM, p = 2 (the default) -------------------------------------------------------------------------------
    model = mlp()
    seen = probe(model, SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1), x, y)
    eps = flat(seen[1]) - flat(seen[0])
    print(f"SAM  p=2:   ||eps||_2 = {eps.norm():.6f}  (rho = {rho})")
    assert math.isclose(eps.norm().item(), rho, rel_tol=1e-9)

    # ---- p = inf ----------------------------------------------------------------------------------------------
    model = mlp()
    seen = probe(model, SAM(model.parameters(), torch.optim.SGD, rho=rho, p=math.inf, lr=0.1), x, y)
    eps = flat(seen[1]) - flat(seen[0])
    print(f"SAM  p=inf: max |eps_i| = {eps.abs().max():.6f}, min |eps_i| = {eps.abs().min():.6f}")
    assert math.isclose(eps.abs().max().item(), rho, rel_tol=1e-9)  # (a zero gradient would leave its coordinate)
    assert math.isclose(eps.abs().min().item(), rho, rel_tol=1e-9)

    # ---- ASAM ----------------------------------------------------------------------------------------------------
    model, asam_rho, eta = mlp(), 0.5, 0.01
    opt = SAM(model.parameters(), torch.optim.SGD, rho=asam_rho, adaptive=True, eta=eta, lr=0.1)
    seen = probe(model, opt, x, y)
    w, eps = flat(seen[0]), flat(seen[1]) - flat(seen[0])
    scaled = (eps / (w.abs() + eta)).norm()
    print(f"ASAM:       ||eps / (|w| + eta)||_2 = {scaled:.6f} (rho = {asam_rho}), plain ||eps||_2 = {eps.norm():.4f}")
    assert math.isclose(scaled.item(), asam_rho, rel_tol=1e-9)

    # ---- per-group rho: perturb only the last layer (groups may also set their own lr, as usual) ----------------
    model = mlp()
    groups = [{"params": model[0].parameters(), "rho": 0.0}, {"params": model[2].parameters(), "lr": 0.05}]
    seen = probe(model, SAM(groups, torch.optim.SGD, rho=rho, lr=0.1), x, y)
    eps = [b - a for a, b in zip(seen[0], seen[1], strict=True)]
    first, last = flat(eps[:2]), flat(eps[2:])
    print(f"per-group:  ||eps|| first layer (rho=0) = {first.norm():.1e}, last layer = {last.norm():.6f}")
    assert torch.count_nonzero(first) == 0 and math.isclose(last.norm().item(), rho, rel_tol=1e-9)

    # ---- ascent_steps = 2 ----------------------------------------------------------------------------------------
    model = mlp()
    seen = probe(model, SAM(model.parameters(), torch.optim.SGD, rho=rho, ascent_steps=2, lr=0.1), x, y)
    steps = [(flat(seen[i + 1]) - flat(seen[i])).norm().item() for i in range(2)]
    total = (flat(seen[2]) - flat(seen[0])).norm().item()
    print(f"ascent_steps=2: {len(seen)} closure calls, steps of {steps[0]:.4f} and {steps[1]:.4f}, total {total:.6f}")
    assert len(seen) == 3 and all(math.isclose(s, rho / 2, rel_tol=1e-9) for s in steps) and total <= rho + 1e-12

    # ---- second_order: the update is the exact gradient of L(w + eps-hat(w)) -------------------------------------
    model = mlp()
    names = [name for name, _ in model.named_parameters()]
    w0 = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def loss_at(weights):
        return F.cross_entropy(functional_call(model, dict(zip(names, weights, strict=True)), (x,)), y)

    g = torch.autograd.grad(loss_at(w0), w0, create_graph=True)  # eps-hat as a differentiable function of w
    g_norm = flat(g).norm()
    exact = torch.autograd.grad(loss_at([wi + rho * gi / g_norm for wi, gi in zip(w0, g, strict=True)]), w0)

    # backward(create_graph=True) makes PyTorch warn about a parameter <-> .grad reference cycle; SAM sets .grad
    # to None after the third pass, which breaks it.
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
    lr = 1.0  # plain SGD with lr 1: the update is minus the gradient SAM hands to the base optimizer
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, second_order=True, lr=lr)
    seen = probe(model, opt, x, y)
    used = [(a - p.detach()) / lr for a, p in zip(w0, model.parameters(), strict=True)]
    err = (flat(used) - flat(exact)).abs().max().item()
    print(f"second_order: {len(seen)} closure calls, max |update - exact gradient of L(w + eps(w))| = {err:.1e}")
    assert len(seen) == 3 and err < 1e-10

    # ---- checkpoints: opt.state_dict() carries the base optimizer's momentum ------------------------------------
    def make():
        model = mlp()
        return model, SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9, weight_decay=5e-4)

    def train(model, opt, steps):
        for i in steps:
            probe(model, opt, x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32])

    model, opt = make()
    train(model, opt, range(2))
    state = opt.state_dict()
    print(f"state_dict keys: {sorted(state)}; base state of param 0: {sorted(state['base_optimizer']['state'][0])}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save({"model": model.state_dict(), "optimizer": state}, path)
        checkpoint = torch.load(path, weights_only=True)  # plain tensors and containers only
    resumed_model, resumed_opt = make()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])

    train(model, opt, range(2, 4))  # the uninterrupted run goes on ...
    train(resumed_model, resumed_opt, range(2, 4))  # ... and so does the resumed one
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True))
    print("checkpoint: resumed training is bit-identical to uninterrupted training (momentum restored)")
    print("OK: ASAM, p=inf, per-group rho, ascent_steps, second_order and checkpointing behave as documented")


if __name__ == "__main__":
    main()
