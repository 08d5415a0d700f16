"""LookSAM against a float64 reference written from Algorithm 1 of Liu et al. (2022)."""

from __future__ import annotations

import pytest
import torch

from sharpness import SAM, LookSAM

from ._reference import LR, MOMENTUM, SGD, WD, Model, assert_matches, batches, closure_for, models, orthogonal, unit
from .conftest import Recorder, batch, mlp


@pytest.mark.parametrize("net", ["mlp", "bn"])
def test_looksam_equals_the_reference(net):
    steps, k, alpha, rho = 7, 3, 0.7, 0.1
    module = models(net)
    ref = Model(module)
    data = batches(net, steps)
    opt = LookSAM(
        module.parameters(),
        torch.optim.SGD,
        rho=rho,
        k=k,
        alpha=alpha,
        model=module,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WD,
    )
    for x, y in data:
        opt.step(closure_for(module, x, y))

    w, sgd, g_v = torch.cat([p.detach().flatten() for p in ref.module.parameters()]), SGD(), None
    for t, (x, y) in enumerate(data):
        g = ref.grad(w, x, y, update_buffers=True)
        if t % k == 0:
            g_s = ref.grad(w + rho * unit(g), x, y)
            g_v = orthogonal(g_s, g)
            w = sgd.step(w, g_s)
        else:
            w = sgd.step(w, g + alpha * g.norm() / g_v.norm() * g_v)
    assert_matches(module, w, ref)


def test_reuse_steps_take_one_pass_and_apply_the_gradient_once_from_the_current_w():
    """The pytorch-optimizer bugs: two passes on every step, g doubled on reuse steps, w reset to a snapshot."""
    module = mlp()
    opt = LookSAM(module.parameters(), Recorder, rho=0.05, k=5, alpha=0.0)
    count = [0]
    for step in range(10):
        x, y = batch(seed=step)
        module.zero_grad()
        before = [p.detach().clone() for p in module.parameters()]
        opt.step(closure_for(module, x, y, count))
        # the base optimizer (recording, changing nothing) saw exactly the clean gradient at the current w
        if step % 5:
            expected = torch.autograd.grad(torch.nn.functional.cross_entropy(module(x), y), list(module.parameters()))
            for seen, want in zip(opt.base_optimizer.seen[-1], expected, strict=True):
                assert torch.equal(seen, want)
        assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    assert count[0] == 12  # 2 SAM steps of 2 passes, 8 reuse steps of 1


def test_the_base_step_of_a_reuse_step_starts_from_the_current_weights():
    a, b = models("mlp"), models("mlp")
    data = batches("mlp", 2)
    opt = LookSAM(a.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.0, lr=LR)
    opt.step(closure_for(a, *data[0]))
    sgd = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=LR)
    sgd.step(closure_for(b, *data[0]))
    plain = torch.optim.SGD(b.parameters(), lr=LR)  # the second step, alpha = 0: plain SGD from w_1
    closure_for(b, *data[1])()
    plain.step()
    opt.step(closure_for(a, *data[1]))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_k_one_is_sam_exactly():
    a, b = models("bn"), models("bn")
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.05, model=a, lr=LR, momentum=MOMENTUM)
    look = LookSAM(b.parameters(), torch.optim.SGD, rho=0.05, k=1, model=b, lr=LR, momentum=MOMENTUM)
    for x, y in batches("bn", 3):
        sam.step(closure_for(a, x, y))
        look.step(closure_for(b, x, y))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_manual_loop_first_step_says_whether_to_run_the_second_pass():
    module = mlp()
    opt = LookSAM(module.parameters(), torch.optim.SGD, rho=0.05, k=2, lr=LR)
    x, y = batch()
    plan = []
    for _ in range(4):
        assert opt.next_step_ascends == (len(plan) % 2 == 0)
        closure_for(module, x, y)()
        ascended = opt.first_step()
        if ascended:
            closure_for(module, x, y)()
        opt.step()
        plan.append(ascended)
    assert plan == [True, False, True, False]
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
