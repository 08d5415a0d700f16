"""Friendly-SAM and VaSSO against float64 references written from their papers' rules (and authors' code)."""

from __future__ import annotations

import pytest
import torch

from sharpness import SAM, FriendlySAM, VaSSO

from ._reference import LR, MOMENTUM, SGD, WD, Model, assert_matches, batches, closure_for, flat_params, models, unit


def _run(opt_cls, net, steps, **kwargs):
    module = models(net)
    ref = Model(module)
    data = batches(net, steps)
    opt = opt_cls(
        module.parameters(), torch.optim.SGD, model=module, lr=LR, momentum=MOMENTUM, weight_decay=WD, **kwargs
    )
    for x, y in data:
        opt.step(closure_for(module, x, y))
    return module, ref, data


@pytest.mark.parametrize("net", ["mlp", "bn"])
@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_friendly_sam_equals_the_reference(net, sigma):
    rho, lmbda, steps = 0.1, 0.6, 5
    module, ref, data = _run(FriendlySAM, net, steps, rho=rho, sigma=sigma, lmbda=lmbda)
    w, sgd, m = flat_params(ref.module), SGD(), None
    for x, y in data:
        g = ref.grad(w, x, y, update_buffers=True)
        d = g if m is None else g - sigma * m  # m of the previous steps
        m = g.clone() if m is None else lmbda * m + (1 - lmbda) * g  # fed the raw gradient, after its use
        w = sgd.step(w, ref.grad(w + rho * unit(d), x, y))
    assert_matches(module, w, ref)


@pytest.mark.parametrize("net", ["mlp", "bn"])
def test_vasso_equals_the_reference(net):
    rho, theta, steps = 0.1, 0.4, 5
    module, ref, data = _run(VaSSO, net, steps, rho=rho, theta=theta)
    w, sgd, d = flat_params(ref.module), SGD(), None
    for x, y in data:
        g = ref.grad(w, x, y, update_buffers=True)
        d = g.clone() if d is None else (1 - theta) * d + theta * g
        w = sgd.step(w, ref.grad(w + rho * unit(d), x, y))
    assert_matches(module, w, ref)


@pytest.mark.parametrize(("cls", "option"), [(FriendlySAM, {"sigma": 0.0}), (VaSSO, {"theta": 1.0})])
def test_the_reductions_to_sam(cls, option):
    a, b = models("bn"), models("bn")
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.05, model=a, lr=LR, momentum=MOMENTUM)
    other = cls(b.parameters(), torch.optim.SGD, rho=0.05, model=b, lr=LR, momentum=MOMENTUM, **option)
    for x, y in batches("bn", 3):
        sam.step(closure_for(a, x, y))
        other.step(closure_for(b, x, y))
    for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
