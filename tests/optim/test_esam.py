"""ESAM against a float64 reference written from §3 of Du et al. (2022): SWP per tensor, SDS by sharpness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sharpness import ESAM, SAM

from ._reference import LR, MOMENTUM, SGD, WD, Model, assert_matches, batches, flat_params, models, unit


def _losses_closure(module, x, y):
    def closure(index=None):
        xs, ys = (x, y) if index is None else (x[index], y[index])
        return F.cross_entropy(module(xs), ys, reduction="none")

    return closure


@pytest.mark.parametrize("net", ["mlp", "bn"])
def test_esam_equals_the_reference_given_its_weight_draws(net):
    steps, rho, beta, gamma = 6, 0.1, 0.5, 0.5
    module = models(net)
    ref = Model(module)
    data = batches(net, steps, n=20)
    opt = ESAM(
        module.parameters(),
        torch.optim.SGD,
        rho=rho,
        beta=beta,
        gamma=gamma,
        seed=3,
        model=module,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WD,
    )
    masks = []  # which tensors sat out each step's clean pass (ESAM's draw, made at the end of the step before)
    for x, y in data:
        opt.zero_grad()
        masks.append([not p.requires_grad for p in module.parameters()])
        opt.step(_losses_closure(module, x, y))
    assert not any(masks[0]) and any(any(m) for m in masks[1:])  # the first step uses every tensor, later ones not

    w, sgd = flat_params(ref.module), SGD()
    sizes = [p.numel() for p in ref.module.parameters()]
    for (x, y), frozen in zip(data, masks, strict=True):
        keep = torch.cat(
            [torch.full((n,), float(not f), dtype=torch.float64) for n, f in zip(sizes, frozen, strict=True)]
        )
        clean = ref.losses(w, x, y, update_buffers=True).detach()
        g_hat = keep * ref.grad(w, x, y)
        eps = rho / beta * unit(g_hat)
        sharpness = ref.losses(w + eps, x, y).detach() - clean
        chosen = torch.argsort(sharpness, descending=True)[: int(len(y) * gamma)]
        w = sgd.step(w, ref.grad(w + eps, x[chosen], y[chosen]))
    assert_matches(module, w, ref)


def test_swp_keeps_each_tensor_with_probability_beta():
    module = models("bn")
    opt = ESAM(module.parameters(), torch.optim.SGD, rho=0.05, beta=0.6, gamma=1.0, seed=0, model=module, lr=0.01)
    kept = []
    x, y = batches("bn", 1)[0]
    for _ in range(200):
        opt.zero_grad()
        kept += [p.requires_grad for p in module.parameters()]
        opt.step(_losses_closure(module, x, y))
    assert abs(sum(kept) / len(kept) - 0.6) < 0.05


def test_sds_keeps_the_sharpest_fraction_and_the_whole_batch_when_nothing_is_perturbed():
    module = models("mlp")
    opt = ESAM(module.parameters(), torch.optim.SGD, rho=0.05, gamma=0.25, lr=0.1)
    clean = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    perturbed = torch.tensor([1.5, 1.1, 2.0, 1.0, 0.9, 1.2, 1.05, 1.3])
    x, y = batches("mlp", 1, n=8)[0]
    _losses_closure(module, x, y)().mean().backward()
    opt.first_step()
    assert opt.select(clean, perturbed).tolist() == [0, 2]
    opt.abort_step()
    flat = ESAM(module.parameters(), torch.optim.SGD, rho=0.0, gamma=0.25, lr=0.1)
    _losses_closure(module, x, y)().mean().backward()
    flat.first_step()
    assert flat.select(clean, perturbed).tolist() == list(range(8))


def test_beta_and_gamma_one_are_sam():
    a, b = models("bn"), models("bn")
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.05, model=a, lr=LR, momentum=MOMENTUM)
    esam = ESAM(b.parameters(), torch.optim.SGD, rho=0.05, beta=1.0, gamma=1.0, model=b, lr=LR, momentum=MOMENTUM)
    for x, y in batches("bn", 3):
        sam.zero_grad()
        loss = F.cross_entropy(a(x), y)
        loss.backward()
        sam.first_step()
        F.cross_entropy(a(x), y).backward()
        sam.step()
        esam.zero_grad()
        esam.step(_losses_closure(b, x, y))
    for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


def test_a_closure_that_returns_a_mean_loss_is_refused_and_leaves_every_tensor_trainable():
    module = models("mlp")
    opt = ESAM(module.parameters(), torch.optim.SGD, rho=0.05, beta=0.01, seed=1, lr=0.1)
    x, y = batches("mlp", 1)[0]
    opt.step(_losses_closure(module, x, y))  # draws the next step's frozen tensors
    with pytest.raises(RuntimeError, match="per-example"):
        opt.step(lambda index=None: F.cross_entropy(module(x), y))
    assert all(p.requires_grad for p in module.parameters())
