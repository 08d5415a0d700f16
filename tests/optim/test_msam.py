"""MSAM against a float64 reference written from Figure 1 of Becker et al. (2023): one pass at w - rho v/||v||."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sharpness import MSAM

from ._reference import LR, MOMENTUM, SGD, WD, Model, assert_matches, batches, closure_for, flat_params, models, unit


@pytest.mark.parametrize("net", ["mlp", "bn"])
def test_msam_equals_the_reference(net):
    steps, rho = 5, 0.3
    module = models(net)
    ref = Model(module)
    data = batches(net, steps)
    opt = MSAM(module.parameters(), torch.optim.SGD, rho=rho, model=module, lr=LR, momentum=MOMENTUM, weight_decay=WD)
    count = [0]
    for x, y in data:
        opt.step(closure_for(module, x, y, count))
    assert count[0] == steps

    w, sgd = flat_params(ref.module), SGD()
    for x, y in data:
        point = w if sgd.buf is None else w - rho * unit(sgd.buf)
        w = sgd.step(w, ref.grad(point, x, y, update_buffers=True))
    assert_matches(module, w, ref)


def test_the_pass_runs_at_minus_the_normalised_adam_first_moment():
    module = models("mlp")
    opt = MSAM(module.parameters(), torch.optim.AdamW, rho=0.2, lr=1e-2)
    data = batches("mlp", 3)
    opt.step(closure_for(module, *data[0]))
    for x, y in data[1:]:
        w = flat_params(module)
        m = torch.cat([opt.state[p]["exp_avg"].flatten() for p in module.parameters()])
        seen = []

        def closure(x=x, y=y, seen=seen):
            seen.append(flat_params(module))
            module.zero_grad()
            loss = F.cross_entropy(module(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(seen[0], w - 0.2 * unit(m), rtol=1e-12, atol=1e-14)


def test_msam_without_momentum_is_refused():
    with pytest.raises(ValueError, match="momentum"):
        MSAM(models("mlp").parameters(), torch.optim.SGD, lr=0.1)


def test_manual_loop_perturbs_before_the_pass():
    module = models("mlp")
    opt = MSAM(module.parameters(), torch.optim.SGD, rho=0.3, lr=LR, momentum=MOMENTUM)
    x, y = batches("mlp", 1)[0]
    for _ in range(3):
        opt.zero_grad()
        w = flat_params(module)
        assert opt.first_step() is True
        perturbed = flat_params(module)
        F.cross_entropy(module(x), y).backward()
        opt.step()
        assert not torch.equal(flat_params(module), perturbed) and not torch.equal(flat_params(module), w)
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
        opt.first_step()
