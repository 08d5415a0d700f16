"""SAM at its edges: base optimizers with clashing option names, GradScaler leftovers, hooks, copies, buffers."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sharpness import SAM

from .conftest import Recorder, batch, bn_net, mlp


def _closure(model, x, y, scale: float = 1.0, opt=None):
    def closure():
        loss = F.cross_entropy(model(x), y)
        (loss * scale).backward(create_graph=opt.create_graph if opt is not None else False)
        return loss

    return closure


def _points_seen(model, x, y):
    """A closure that records the parameters at each call, and the list it records into."""
    seen: list[list[torch.Tensor]] = []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        return _closure(model, x, y)()

    return closure, seen


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


# ---------------------------------------------------------------- option names shared with the base optimizer


def test_adadelta_keeps_its_own_rho_beside_sams_radius():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.Adadelta, rho=0.05, lr=1.0)
    group = opt.param_groups[0]
    assert group["rho"] == 0.9 and group["sam_rho"] == 0.05  # Adadelta's default decay, SAM's radius

    x, y = batch()
    instance = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.5)
    opt = SAM(model.parameters(), instance, rho=0.05)
    assert opt.param_groups[0]["rho"] == 0.5
    closure, seen = _points_seen(model, x, y)
    opt.step(closure)
    eps = _flat(seen[1]) - _flat(seen[0])
    torch.testing.assert_close(eps.norm(), torch.tensor(0.05, dtype=torch.float64))


def test_rho_zero_around_adadelta_is_bit_identical_to_adadelta():
    ref, model = mlp(), mlp()
    ref_opt = torch.optim.Adadelta(ref.parameters(), lr=1.0, rho=0.7)
    opt = SAM(model.parameters(), torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.7), rho=0.0)
    for step in range(3):
        x, y = batch(seed=step)
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        opt.zero_grad()
        opt.step(_closure(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters(), strict=True))


def test_group_options_by_either_name_and_not_both():
    model = mlp()
    opt = SAM(
        [{"params": model[0].parameters(), "rho": 0.0}, {"params": model[2].parameters(), "sam_rho": 0.2}],
        torch.optim.SGD,
        lr=0.1,
    )
    assert [g["sam_rho"] for g in opt.param_groups] == [0.0, 0.2]
    assert all("rho" not in g for g in opt.param_groups)
    with pytest.raises(ValueError, match="both"):
        SAM([{"params": model.parameters(), "rho": 0.1, "sam_rho": 0.2}], torch.optim.SGD, lr=0.1)


def test_loading_a_plain_state_dict_keeps_the_groups_sam_options():
    model = mlp()
    groups = [{"params": model[0].parameters(), "rho": 0.0}, {"params": model[2].parameters(), "adaptive": True}]
    opt = SAM(groups, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(
        [{"params": mlp()[0].parameters()}, {"params": mlp()[2].parameters()}], lr=0.5, momentum=0.9
    ).state_dict()
    opt.load_state_dict(plain)
    options = [(g["lr"], g["sam_rho"], g["sam_adaptive"]) for g in opt.param_groups]
    assert options == [(0.5, 0.0, False), (0.5, 0.1, True)]


def test_state_is_the_base_optimizers():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.step(_closure(model, x, y))
    assert opt.state is opt.base_optimizer.state
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in model.parameters())


# ---------------------------------------------------------------- skipping


def test_a_skipped_first_step_of_fused_sgd_leaves_no_uninitialised_momentum():
    """torch's fused SGD keeps empty_like momentum buffers when its first step is skipped on the device."""
    model, ref = mlp(torch.float32), mlp(torch.float32)
    x, y = batch(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, fused=True)
    ref_opt = SAM(ref.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, fused=True)
    opt.step(_closure(model, x, y, scale=math.inf))
    assert bool(opt.last_step_skipped)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))
    for _ in range(2):
        opt.zero_grad()
        opt.step(_closure(model, x, y))
        ref_opt.zero_grad()
        ref_opt.step(_closure(ref, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True))


def test_huge_but_finite_gradients_are_not_skipped():
    model = mlp(torch.float32)
    x, y = batch(dtype=torch.float32)
    opt = SAM(model.parameters(), Recorder, rho=0.05)
    opt.step(_closure(model, x, y, scale=1e20))  # squares overflow float32
    assert not bool(opt.last_step_skipped) and len(opt.base_optimizer.seen) == 1


def test_a_refused_grad_scaler_call_leaves_nothing_behind():
    model = mlp(torch.float32)
    x, y = batch(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt, _closure(model, x, y))
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    twin = copy.deepcopy(model)
    twin_opt = SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        o.step(_closure(m, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


# ---------------------------------------------------------------- hooks, schedulers, copies


@pytest.mark.parametrize("form", ["closure", "two_pass", "plain_step"])
def test_each_form_is_one_optimizer_step_for_hooks_and_schedulers(form):
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would be an error here
        for _ in range(2):
            opt.zero_grad()
            if form == "closure":
                opt.step(_closure(model, x, y))
            else:
                F.cross_entropy(model(x), y).backward()
                opt.first_step()
                F.cross_entropy(model(x), y).backward()
                opt.second_step() if form == "two_pass" else opt.step()
            sched.step()
    assert calls == ["pre", "post"] * 2


def test_deepcopy_and_pickle_with_a_scheduler_attached():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    opt.step(_closure(model, x, y))
    twin = copy.deepcopy({"model": model, "opt": opt})
    before = [p.detach().clone() for p in twin["model"].parameters()]
    twin["opt"].zero_grad()
    twin["opt"].step(_closure(twin["model"], x, y))
    assert not any(torch.equal(a, b) for a, b in zip(before, twin["model"].parameters(), strict=True))
    opt.zero_grad()
    opt.step(_closure(model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin["model"].parameters(), strict=True))
    restored = pickle.loads(pickle.dumps({"model": model, "opt": opt}))
    restored["opt"].zero_grad()
    restored["opt"].step(_closure(restored["model"], x, y))


# ---------------------------------------------------------------- buffers


class _Counter(nn.Module):
    """A layer that replaces its buffer instead of updating it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        if self.training:
            self.count = self.count + 1
        return x


def test_buffers_replaced_out_of_place_are_restored_too():
    model = nn.Sequential(_Counter(), *mlp())
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1)
    for step in range(3):
        opt.zero_grad()
        opt.step(_closure(model, x, y))
        assert int(model[0].count) == step + 1


# ---------------------------------------------------------------- exact references for the options


def test_k_ascent_steps_follow_the_gradient_at_each_point():
    """k steps of radius rho/k, each along the gradient at the current point (Appendix C.6), in float64."""
    model = mlp()
    x, y = batch()
    names, w = zip(*[(n, q.detach().clone()) for n, q in model.named_parameters()], strict=True)
    rho, k = 0.3, 3

    def grad_at(values):
        leaves = [t.clone().requires_grad_() for t in values]
        out = functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
        return torch.autograd.grad(F.cross_entropy(out, y), leaves)

    point = list(w)
    for _ in range(k):
        g = grad_at(point)
        norm = _flat(g).norm()
        point = [t + (rho / k) * gi / norm for t, gi in zip(point, g, strict=True)]
    expected = grad_at(point)

    opt = SAM(model.parameters(), Recorder, rho=rho, ascent_steps=k)
    opt.step(_closure(model, x, y))
    for got, want in zip(opt.base_optimizer.seen[0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_norm_runs_over_all_groups():
    model = mlp()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}]
    opt = SAM(groups, Recorder, rho=0.05)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    eps = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
    norm = _flat(g).norm()
    for e, gi in zip(eps, g, strict=True):
        torch.testing.assert_close(e, 0.05 * gi / norm, rtol=1e-10, atol=1e-14)
    opt.second_step()


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_second_order_term_for_p_other_than_two(p):
    model = mlp()
    x, y = batch()
    names, w = zip(*[(n, q.detach().clone().requires_grad_()) for n, q in model.named_parameters()], strict=True)
    rho, q = 0.1, p / (p - 1)

    def loss_at(values):
        return F.cross_entropy(functional_call(model, dict(zip(names, values, strict=True)), (x,)), y)

    g = torch.autograd.grad(loss_at(w), w, create_graph=True)
    dual = _flat(g).abs().pow(q).sum().pow(1 / q)
    eps = [rho * torch.sign(gi) * gi.abs().pow(q - 1) / dual.pow(q - 1) for gi in g]
    exact = torch.autograd.grad(loss_at([a + b for a, b in zip(w, eps, strict=True)]), w)

    opt = SAM(model.parameters(), Recorder, rho=rho, p=p, second_order=True)
    opt.step(_closure(model, x, y, opt=opt))
    for got, want in zip(opt.base_optimizer.seen[0], exact, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_bf16_autocast_gives_the_float32_update_gradient_to_bf16_accuracy():
    model32 = bn_net()
    model16 = copy.deepcopy(model32)
    x, y = batch(16, torch.float32, image=True)
    o32 = SAM(model32.parameters(), Recorder, rho=0.05, model=model32)
    o16 = SAM(model16.parameters(), Recorder, rho=0.05, model=model16)
    o32.step(_closure(model32, x, y))

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model16(x).float(), y)
        loss.backward()
        return loss

    o16.step(closure)
    got, want = _flat(o16.base_optimizer.seen[0]), _flat(o32.base_optimizer.seen[0])
    assert got.dtype == torch.float32
    cosine = torch.dot(got, want) / (got.norm() * want.norm())
    assert cosine > 0.999 and torch.isclose(got.norm(), want.norm(), rtol=0.02)
