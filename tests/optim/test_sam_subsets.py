"""m-sharpness training (§4.1): one perturbation per subset of the batch, against a float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from sharpness import SAM

from .conftest import Recorder, batch, bn_net, mlp


def _subset_step(model, opt, x, y, m, scaler=None, ascents=1):
    n = len(y)
    for i, (xs, ys) in enumerate(zip(x.split(m), y.split(m), strict=True)):
        if i:
            opt.next_subset()
        for _ in range(ascents):
            loss = F.cross_entropy(model(xs), ys) * len(ys) / n
            (scaler.scale(loss) if scaler else loss).backward()
            opt.first_step()
        loss = F.cross_entropy(model(xs), ys) * len(ys) / n
        (scaler.scale(loss) if scaler else loss).backward()


def _reference_gradient(model, x, y, m, rho, ascents=1):
    """sum_i |S_i|/n * grad L_{S_i} at w_i, where w_i takes ``ascents`` steps of rho/k from w, each along the
    normalised gradient of L_{S_i} at the current point (k = 1: w + rho g_i/||g_i||, g_i = grad L_{S_i}(w))."""
    names, w = zip(*[(n, q.detach().clone()) for n, q in model.named_parameters()], strict=True)

    def subset_grad(values, xs, ys):
        leaves = [v.clone().requires_grad_() for v in values]
        loss = F.cross_entropy(functional_call(model, dict(zip(names, leaves, strict=True)), (xs,)), ys)
        return torch.autograd.grad(loss, leaves)

    total = [torch.zeros_like(t) for t in w]
    for xs, ys in zip(x.split(m), y.split(m), strict=True):
        point = list(w)
        for _ in range(ascents):
            g = subset_grad(point, xs, ys)
            norm = torch.cat([t.flatten() for t in g]).norm()
            point = [t + (rho / ascents) * gi / norm for t, gi in zip(point, g, strict=True)]
        for acc, gi in zip(total, subset_grad(point, xs, ys), strict=True):
            acc += gi * len(ys) / len(y)
    return total


@pytest.mark.parametrize("m", [4, 6, 16])
def test_each_subset_is_perturbed_by_its_own_gradient(m):
    model = mlp()
    x, y = batch(16)
    expected = _reference_gradient(model, x, y, m, rho=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), Recorder, rho=0.1)
    _subset_step(model, opt, x, y, m)
    opt.second_step()
    for got, want in zip(opt.base_optimizer.seen[0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_subsets_of_the_whole_batch_are_plain_sam():
    a, b = bn_net(), bn_net()
    x, y = batch(8, torch.float32, image=True)
    oa = SAM(a.parameters(), torch.optim.SGD, rho=0.05, model=a, lr=0.1, momentum=0.9)
    ob = SAM(b.parameters(), torch.optim.SGD, rho=0.05, model=b, lr=0.1, momentum=0.9)

    def closure():
        loss = F.cross_entropy(a(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        oa.zero_grad()
        oa.step(closure)
        ob.zero_grad()
        _subset_step(b, ob, x, y, m=8)
        ob.step()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_buffers_see_each_subsets_clean_pass_once():
    model = bn_net()
    clean = copy.deepcopy(model)
    x, y = batch(8, torch.float32, image=True)
    for xs in x.split(4):
        clean(xs)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, model=model, lr=0.0)
    _subset_step(model, opt, x, y, m=4)
    opt.second_step()
    for a, b in zip(clean.buffers(), model.buffers(), strict=True):
        assert torch.equal(a, b)


def test_grad_scaler_and_clipping_see_the_sum():
    model = mlp()
    x, y = batch(12)
    total = _reference_gradient(model, x, y, m=4, rho=0.05)
    norm = torch.cat([t.flatten() for t in total]).norm()
    clip = float(norm) / 3  # binding
    factor = clip / (float(norm) + 1e-6)  # torch.nn.utils.clip_grad_norm_'s coefficient
    for use_scaler in (False, True):
        run = copy.deepcopy(model)
        opt = SAM(run.parameters(), Recorder, rho=0.05, max_grad_norm=clip)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
        _subset_step(run, opt, x, y, m=4, scaler=scaler)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.second_step()
        for got, want in zip(opt.base_optimizer.seen[0], total, strict=True):
            torch.testing.assert_close(got, want * factor, rtol=1e-9, atol=1e-12)


def test_an_overflow_in_an_early_subset_skips_the_step():
    model = mlp(torch.float32)
    x, y = batch(8, torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    F.cross_entropy(model(x[:4]), y[:4]).mul(float("inf")).backward()
    opt.first_step()
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    opt.next_subset()
    F.cross_entropy(model(x[4:]), y[4:]).backward()
    opt.first_step()
    F.cross_entropy(model(x[4:]), y[4:]).backward()
    opt.second_step()
    assert bool(opt.last_step_skipped)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_several_ascent_steps_per_subset():
    model = mlp()
    x, y = batch(8)
    expected = _reference_gradient(model, x, y, m=4, rho=0.1, ascents=2)
    opt = SAM(model.parameters(), Recorder, rho=0.1, ascent_steps=2)
    _subset_step(model, opt, x, y, m=4, ascents=2)
    opt.second_step()
    for got, want in zip(opt.base_optimizer.seen[0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_call_order_errors():
    model = mlp()
    x, y = batch(8)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.next_subset()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    F.cross_entropy(model(x), y).backward()
    opt.next_subset()
    with pytest.raises(RuntimeError, match="next subset"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="between"):
        opt.state_dict()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="zero_grad"):
        opt.first_step(zero_grad=False)
    opt.abort_step()
    opt.zero_grad()
    opt.state_dict()
