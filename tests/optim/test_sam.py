"""SAM against exact references: the update gradient (eq. 3), the second-order term, and the base optimizer."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from sharpness import SAM

from .conftest import Recorder, batch, bn_net, mlp


def _closure(model, x, y, opt=None):
    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=opt.create_graph if opt is not None else False)
        return loss

    return closure


def _eps_reference(grads, params, rho, p, adaptive, eta=0.01):
    g = torch.cat([t.flatten() for t in grads])
    t = torch.cat([w.flatten().abs() + eta for w in params]) if adaptive else torch.ones_like(g)
    s = t * g
    if math.isinf(p):
        eps = rho * t * torch.sign(s)
    else:
        q = p / (p - 1)
        eps = rho * t * torch.sign(s) * s.abs() ** (q - 1) / (s.abs() ** q).sum() ** (1 / p)
    out, i = [], 0
    for w in params:
        out.append(eps[i : i + w.numel()].view_as(w))
        i += w.numel()
    return out


def _loss_at(model, names, values, x, y):
    return F.cross_entropy(functional_call(model, dict(zip(names, values, strict=True)), (x,)), y)


@pytest.mark.parametrize("p", [2.0, math.inf, 3.0])
@pytest.mark.parametrize("adaptive", [False, True])
def test_update_gradient_is_the_gradient_at_w_plus_eps(p, adaptive):
    model = mlp()
    x, y = batch()
    names, w = zip(*[(n, q.detach().clone()) for n, q in model.named_parameters()], strict=True)
    w = [t.requires_grad_() for t in w]
    g = torch.autograd.grad(_loss_at(model, names, w, x, y), w)
    eps = _eps_reference(g, [t.detach() for t in w], 0.05, p, adaptive)
    shifted = [(a + b).detach().requires_grad_() for a, b in zip(w, eps, strict=True)]
    expected = torch.autograd.grad(_loss_at(model, names, shifted, x, y), shifted)

    opt = SAM(model.parameters(), Recorder, rho=0.05, p=p, adaptive=adaptive)
    opt.step(_closure(model, x, y))
    for got, want in zip(opt.base_optimizer.seen[0], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for param, original in zip(model.parameters(), w, strict=True):
        assert torch.equal(param, original.detach()), "w must be restored bit-exactly"


@pytest.mark.parametrize("adaptive", [False, True])
def test_second_order_term_matches_autograd_through_eps(adaptive):
    model = mlp()
    x, y = batch()
    names, w = zip(*[(n, q.detach().clone().requires_grad_()) for n, q in model.named_parameters()], strict=True)
    rho, eta = 0.1, 0.01
    g = torch.autograd.grad(_loss_at(model, names, w, x, y), w, create_graph=True)
    norm = torch.cat(
        [(((t.abs() + eta) if adaptive else 1.0) * gi).flatten() for t, gi in zip(w, g, strict=True)]
    ).norm()
    eps = [rho * ((t.abs() + eta) ** 2 if adaptive else 1.0) * gi / norm for t, gi in zip(w, g, strict=True)]
    exact = torch.autograd.grad(_loss_at(model, names, [a + b for a, b in zip(w, eps, strict=True)], x, y), w)

    opt = SAM(model.parameters(), Recorder, rho=rho, adaptive=adaptive, eta=eta, second_order=True)
    opt.step(_closure(model, x, y, opt))
    shifted = [(a + b).detach().requires_grad_() for a, b in zip(w, eps, strict=True)]
    first_order = torch.autograd.grad(_loss_at(model, names, shifted, x, y), shifted)
    for got, want, fo in zip(opt.base_optimizer.seen[0], exact, first_order, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(fo, want), "the second-order term must matter in this test"


def test_second_order_needs_create_graph_and_the_closure_form():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, second_order=True, lr=0.1)
    with pytest.raises(RuntimeError, match="create_graph"):
        opt.step(_closure(model, x, y))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, second_order=True, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="closure form"):
        opt.first_step()


def test_sam_converges_to_the_flat_minimum_where_sgd_finds_a_sharp_one():
    """L(u, v) = (uv - 1)^2 / 2: minima on uv = 1 with lambda_max = u^2 + v^2, flattest at u = v = 1 (lambda = 2)."""
    results = {}
    for rho in (0.0, 0.1):
        w = torch.tensor([0.25, 3.5], dtype=torch.float64, requires_grad=True)
        opt = SAM([w], torch.optim.SGD, rho=rho, lr=0.02)

        def closure(w=w):
            loss = 0.5 * (w[0] * w[1] - 1) ** 2
            loss.backward()
            return loss

        for _ in range(20000):
            opt.step(closure)
        u, v = w.tolist()
        results[rho] = (u * v, u * u + v * v)
    assert abs(results[0.0][0] - 1) < 1e-6 and results[0.0][1] > 12  # SGD: a sharp minimum next to the start
    assert abs(results[0.1][0] - 1) < 0.05 and results[0.1][1] < 2.1  # SAM: near the flattest, lambda = 2


@pytest.mark.parametrize(
    "base, kwargs",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)),
        (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-4)),
        (torch.optim.AdamW, dict(lr=1e-2)),
    ],
)
@pytest.mark.parametrize("form", ["closure", "two_pass"])
def test_rho_zero_is_bit_identical_to_the_base_optimizer(base, kwargs, form):
    ref_model, sam_model = bn_net(), bn_net()
    ref_opt = base(ref_model.parameters(), **kwargs)
    opt = SAM(sam_model.parameters(), base, rho=0.0, model=sam_model, **kwargs)
    for step in range(4):
        x, y = batch(8, torch.float32, seed=step, image=True)
        ref_opt.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        ref_opt.step()
        if form == "closure":
            opt.zero_grad()
            opt.step(_closure(sam_model, x, y))
        else:
            opt.zero_grad()
            F.cross_entropy(sam_model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(sam_model(x), y).backward()
            opt.second_step(zero_grad=True)
    for a, b in zip(ref_model.state_dict().values(), sam_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ref_state, sam_state = ref_opt.state_dict()["state"], opt.state_dict()["base_optimizer"]["state"]
    assert ref_state.keys() == sam_state.keys()
    for k in ref_state:
        for key in ref_state[k]:
            assert torch.equal(torch.as_tensor(ref_state[k][key]), torch.as_tensor(sam_state[k][key])), key


@pytest.mark.parametrize("form", ["closure", "two_pass"])
def test_buffers_end_as_the_clean_pass_left_them(form):
    model = bn_net()
    clean = copy.deepcopy(model)
    x, y = batch(8, torch.float32, image=True)
    clean(x)  # one clean forward in train mode: the state SAM must leave
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, model=model, lr=0.0)
    if form == "closure":
        opt.step(_closure(model, x, y))
    else:
        F.cross_entropy(model(x), y).backward()
        opt.first_step()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # a plain step() finishes the SAM step, as trainers call it
    for a, b in zip(clean.buffers(), model.buffers(), strict=True):
        assert torch.equal(a, b)


def test_each_foreach_copy_holds_one_dtype(monkeypatch):
    """CUDA's one-launch copy needs one dtype per list: BatchNorm's int64 counter is copied apart."""
    calls = []
    real = torch._foreach_copy_

    def recording(targets, sources):
        calls.append(({t.dtype for t in targets}, {t.dtype for t in sources}))
        return real(targets, sources)

    model = bn_net()
    x, y = batch(8, torch.float32, image=True)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, model=model, lr=0.1)
    monkeypatch.setattr(torch, "_foreach_copy_", recording)
    opt.step(_closure(model, x, y))
    assert calls and all(len(dst) == 1 and dst == src for dst, src in calls)
    assert {torch.int64} in [dst for dst, _ in calls]  # num_batches_tracked was backed up and restored


def test_without_model_the_perturbed_pass_updates_buffers_too():
    model = bn_net()
    x, y = batch(8, torch.float32, image=True)
    SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1).step(_closure(model, x, y))
    assert model[1].num_batches_tracked.item() == 2


@pytest.mark.parametrize(
    "base, kwargs",
    [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)), (torch.optim.Adam, dict(lr=1e-2))],
)
def test_state_dict_round_trip_resumes_exactly(base, kwargs):
    def make():
        model = bn_net()
        return model, SAM(model.parameters(), base, rho=0.05, model=model, **kwargs)

    def train(model, opt, steps):
        for step in steps:
            x, y = batch(8, torch.float32, seed=step, image=True)
            opt.zero_grad()
            opt.step(_closure(model, x, y))

    model, opt = make()
    train(model, opt, range(6))

    model2, opt2 = make()
    train(model2, opt2, range(3))
    blob = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    assert saved["opt"]["base_optimizer"]["state"], "the base optimizer's state must be in the checkpoint"
    model3, opt3 = make()
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    train(model3, opt3, range(3, 6))
    for a, b in zip(model.state_dict().values(), model3.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_instance_base_optimizer_with_groups_and_per_group_rho():
    model = mlp()
    x, y = batch()
    first, last = model[0], model[2]
    base = torch.optim.SGD([{"params": first.parameters()}, {"params": last.parameters(), "lr": 0.01}], lr=0.1)
    opt = SAM([{"params": first.parameters(), "rho": 0.0}, {"params": last.parameters()}], base, rho=0.05)
    assert opt.param_groups is base.param_groups
    assert [g["sam_rho"] for g in opt.param_groups] == [0.0, 0.05]
    seen = {}

    def closure():
        if "first" in seen:
            seen["perturbed_first"] = [p.detach().clone() for p in first.parameters()]
            seen["perturbed_last"] = [p.detach().clone() for p in last.parameters()]
        seen["first"] = True
        return _closure(model, x, y)()

    before_first = [p.detach().clone() for p in first.parameters()]
    before_last = [p.detach().clone() for p in last.parameters()]
    opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(seen["perturbed_first"], before_first, strict=True))
    eps = [a - b for a, b in zip(seen["perturbed_last"], before_last, strict=True)]
    torch.testing.assert_close(torch.cat([e.flatten() for e in eps]).norm(), torch.tensor(0.05, dtype=torch.float64))


def test_instance_built_on_other_parameters_is_rejected():
    model, other = mlp(), mlp(seed=1)
    with pytest.raises(ValueError, match="other parameters"):
        SAM(model.parameters(), torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="constructor"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), lr=0.1)


def test_parameters_without_gradients_are_skipped():
    model = mlp()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    x, y = batch()
    opt = SAM([*model.parameters(), unused], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.step(_closure(model, x, y))
    assert torch.equal(unused, torch.ones(3, dtype=torch.float64))


def test_adaptive_weights_only_leaves_biases_unscaled():
    model = mlp()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    opt = SAM(model.parameters(), Recorder, rho=0.05, adaptive=True, adaptive_weights_only=True, model=model)
    opt.first_step()
    got = [p.detach() - b for p, b in zip(params, before, strict=True)]
    t = [
        (b.abs() + 0.01) if name.endswith("weight") else torch.ones_like(b)
        for (name, _), b in zip(model.named_parameters(), before, strict=True)
    ]
    norm = torch.cat([(ti * g).flatten() for ti, g in zip(t, grads, strict=True)]).norm()
    for e, ti, g in zip(got, t, grads, strict=True):
        torch.testing.assert_close(e, 0.05 * ti * ti * g / norm, rtol=1e-6, atol=1e-12)
    opt.second_step()
    with pytest.raises(ValueError, match="model="):
        SAM(model.parameters(), Recorder, adaptive=True, adaptive_weights_only=True)


def test_ascent_steps_on_a_linear_loss_equal_one_step_and_stay_in_the_ball():
    """For a linear loss the gradient is constant, so k steps of rho/k add up to the one-step eps."""
    c = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    for k in (1, 3):
        w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = SAM([w], Recorder, rho=0.5, ascent_steps=k)
        points = []

        def closure(w=w, points=points):
            points.append(w.detach().clone())
            loss = (c * w).sum() + 0.5 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        assert len(points) == k + 1
        assert all(pt.norm() <= 0.5 + 1e-12 for pt in points)
        if k == 1:
            one_step = points[-1]
    assert points[-1].norm() <= 0.5 + 1e-12
    # with the quadratic term the gradient changes a little along the way: same direction, close point
    torch.testing.assert_close(points[-1] / points[-1].norm(), one_step / one_step.norm(), rtol=0.05, atol=0.05)


def test_two_pass_and_closure_forms_agree_bitwise():
    m1, m2 = bn_net(), bn_net()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.05, model=m1, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.05, model=m2, lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = batch(8, torch.float32, seed=step, image=True)
        o1.zero_grad()
        loss1 = o1.step(_closure(m1, x, y))
        o2.zero_grad()
        loss2 = F.cross_entropy(m2(x), y)
        loss2.backward()
        o2.first_step(zero_grad=True)
        F.cross_entropy(m2(x), y).backward()
        o2.second_step(zero_grad=True)
        assert torch.equal(loss1, loss2)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_call_order_errors():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step\\(\\) called 2 times"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="between"):
        opt.step(_closure(model, x, y))
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(rho=-0.1), ValueError),
        (dict(rho=float("nan")), ValueError),
        (dict(rho=float("inf")), ValueError),
        (dict(p=0.5), ValueError),
        (dict(p=1.0), ValueError),
        (dict(eta=0.0), ValueError),
        (dict(ascent_steps=0), ValueError),
        (dict(ascent_steps=2, second_order=True), ValueError),
        (dict(max_grad_norm=-1.0), ValueError),
        (dict(rho="0.05"), TypeError),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error):
    with pytest.raises(error):
        SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_bad_group_rho_and_base_optimizer():
    model = mlp()
    with pytest.raises(ValueError, match="group"):
        SAM([{"params": model.parameters(), "rho": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="Optimizer class or instance"):
        SAM(model.parameters(), "sgd", lr=0.1)


def test_schedulers_work_on_sam_and_on_its_base_optimizer():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(model, x, y))
    sched.step()
    assert opt.param_groups[0]["lr"] == opt.base_optimizer.param_groups[0]["lr"] == 0.05
    sched2 = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    opt.step(_closure(model, x, y))
    sched2.step()
    assert opt.param_groups[0]["lr"] == 0.025
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4)  # needs 'momentum'
    opt.step(_closure(model, x, y))
    one_cycle.step()
    assert opt.base_optimizer.param_groups[0]["momentum"] != 0.9


@pytest.mark.parametrize("which", ["first", "second"])
@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_gradient_skips_the_step_and_says_so(which, fused):
    model = mlp(torch.float32)
    x, y = batch(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, fused=fused or None)
    opt.step(_closure(model, x, y))
    assert not opt.last_step_skipped
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    calls = []

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        bad = (which == "first") == (len(calls) == 1)
        (loss * (float("nan") if bad else 1.0)).backward()
        return loss

    opt.step(closure)
    assert bool(opt.last_step_skipped) and int(opt.skipped_steps) == 1
    for a, b in zip(before.values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for k, v in state_before["base_optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], opt.state_dict()["base_optimizer"]["state"][k]["momentum_buffer"])


def test_max_grad_norm_clips_the_final_gradient():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), Recorder, rho=0.05, max_grad_norm=1e-3)
    opt.step(_closure(model, x, y))
    total = torch.cat([g.flatten() for g in opt.base_optimizer.seen[0]]).norm()
    torch.testing.assert_close(total, torch.tensor(1e-3, dtype=torch.float64), rtol=1e-5, atol=0)


def test_gradient_accumulation_equals_the_full_batch_step():
    """Accumulate both passes over micro-batches (each loss / number of micro-batches): same step as one batch."""
    full, acc = mlp(), mlp()
    x, y = batch(16)
    o_full = SAM(full.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    o_full.step(_closure(full, x, y))
    o_acc = SAM(acc.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    chunks = list(zip(x.chunk(4), y.chunk(4), strict=True))
    for xi, yi in chunks:
        (F.cross_entropy(acc(xi), yi) / len(chunks)).backward()
    o_acc.first_step(zero_grad=True)
    for xi, yi in chunks:
        (F.cross_entropy(acc(xi), yi) / len(chunks)).backward()
    o_acc.second_step(zero_grad=True)
    for a, b in zip(full.parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_compiled_model_gives_the_eager_result():
    eager, compiled = bn_net(), bn_net()
    o1 = SAM(eager.parameters(), torch.optim.SGD, rho=0.05, model=eager, lr=0.1, momentum=0.9)
    o2 = SAM(compiled.parameters(), torch.optim.SGD, rho=0.05, model=compiled, lr=0.1, momentum=0.9)
    fast = torch.compile(compiled, backend="aot_eager")
    for step in range(3):
        x, y = batch(8, torch.float32, seed=step, image=True)
        o1.zero_grad()
        o1.step(_closure(eager, x, y))
        o2.zero_grad()
        o2.step(_closure(fast, x, y))
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- regressions found in review


def test_param_groups_follow_the_base_optimizer_after_it_loads_a_state():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.step(_closure(model, x, y))
    plain = torch.optim.SGD(mlp().parameters(), lr=0.5, momentum=0.9).state_dict()
    opt.base_optimizer.load_state_dict(plain)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(model, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.25
    opt.load_state_dict(plain)  # a plain optimizer's state loads into the base optimizer
    assert opt.param_groups[0]["lr"] == 0.5
    opt.step(_closure(model, x, y))  # groups without SAM's keys fall back to SAM's defaults


def test_an_exception_in_the_closure_restores_w():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _closure(model, x, y)()

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    opt.zero_grad()
    opt.step(_closure(model, x, y))  # usable again


def test_closure_without_backward_is_an_error():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.step(lambda: torch.zeros(()))


def test_deepcopy_and_pickle_keep_a_working_optimizer():
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9)
    opt.step(_closure(model, x, y))
    twin = copy.deepcopy({"model": model, "opt": opt})
    twin["opt"].zero_grad()
    twin["opt"].step(_closure(twin["model"], x, y))
    opt.zero_grad()
    opt.step(_closure(model, x, y))
    for a, b in zip(model.parameters(), twin["model"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_asam_with_several_ascent_steps_stays_in_its_ball():
    """ASAM's ball is ||T_w^-1 eps|| <= rho with T_w taken at w, also after k steps."""
    model = mlp()
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), Recorder, rho=1.0, adaptive=True, ascent_steps=3)
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        return _closure(model, x, y)()

    opt.step(closure)
    for point in seen[1:]:
        scaled = torch.cat([((q - w) / (w.abs() + 0.01)).flatten() for q, w in zip(point, before, strict=True)])
        assert scaled.norm() <= 1.0 + 1e-9


def test_step_bookkeeping_is_shared_with_attribute_forwarding_wrappers():
    """Lightning's LightningOptimizer copies the optimizer's __dict__ into a subclass instance."""
    model = mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    wrapper = object.__new__(type("LightningSAM", (SAM,), {}))
    wrapper.__dict__ = dict(opt.__dict__)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    wrapper.first_step()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the real optimizer knows a step is in progress
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert wrapper._run.ascents == 0
