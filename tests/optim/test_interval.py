"""SAM on some steps: every k (IntervalSAM), with probability p (StochasticSAM), on gradient outliers (AESAM)."""

from __future__ import annotations

import math

import pytest
import torch

from sharpness import AESAM, SAM, IntervalSAM, StochasticSAM

from ._reference import LR, MOMENTUM, SGD, WD, Model, assert_matches, batches, closure_for, flat_params, models, unit


def _reference(ref, data, ascends, rho):
    w, sgd = flat_params(ref.module), SGD()
    for (x, y), sam_step in zip(data, ascends, strict=True):
        g = ref.grad(w, x, y, update_buffers=True)
        w = sgd.step(w, ref.grad(w + rho * unit(g), x, y) if sam_step else g)
    return w


def _train(opt_cls, net, steps, rho, **kwargs):
    module = models(net)
    ref = Model(module)
    data = batches(net, steps)
    opt = opt_cls(
        module.parameters(), torch.optim.SGD, rho=rho, model=module, lr=LR, momentum=MOMENTUM, weight_decay=WD, **kwargs
    )
    passes = []
    for x, y in data:
        count = [0]
        opt.step(closure_for(module, x, y, count))
        passes.append(count[0])
    return module, ref, data, passes


@pytest.mark.parametrize("net", ["mlp", "bn"])
def test_interval_sam_is_sam_every_k_steps_and_sgd_between(net):
    module, ref, data, passes = _train(IntervalSAM, net, 10, 0.1, k=2)
    assert passes == [2, 1] * 5 and sum(passes) == 15
    assert_matches(module, _reference(ref, data, [t % 2 == 0 for t in range(10)], 0.1), ref)


@pytest.mark.parametrize("net", ["mlp", "bn"])
def test_stochastic_sam_follows_its_draws(net):
    module, ref, data, passes = _train(StochasticSAM, net, 12, 0.1, probability=0.5, seed=4)
    ascends = [p == 2 for p in passes]
    assert 0 < sum(ascends) < 12
    assert_matches(module, _reference(ref, data, ascends, 0.1), ref)
    again = _train(StochasticSAM, net, 12, 0.1, probability=0.5, seed=4)[3]
    assert again == passes


def test_stochastic_sam_answers_before_the_pass_what_the_step_then_does():
    module = models("mlp")
    opt = StochasticSAM(module.parameters(), torch.optim.SGD, rho=0.1, probability=0.5, seed=0, lr=LR)
    x, y = batches("mlp", 1)[0]
    for _ in range(20):
        planned = opt.next_step_ascends
        assert opt.next_step_ascends == planned  # asking twice draws once
        closure_for(module, x, y)()
        assert opt.first_step() == planned
        if planned:
            closure_for(module, x, y)()
        opt.step()


@pytest.mark.parametrize("net", ["mlp", "bn"])
def test_aesam_ascends_when_the_squared_gradient_norm_is_an_outlier(net):
    steps, rho, decay, c0, c1 = 12, 0.1, 0.6, 0.5, -0.5
    module, ref, data, passes = _train(AESAM, net, steps, rho, c_start=c0, c_end=c1, decay=decay, total_steps=steps)
    w, sgd, mean, var, ascends = flat_params(ref.module), SGD(), None, 0.0, []
    for t, (x, y) in enumerate(data):
        g = ref.grad(w, x, y, update_buffers=True)
        n = float(g @ g)
        if mean is None:
            mean = n
        else:
            mean = decay * mean + (1 - decay) * n
            var = decay * var + (1 - decay) * (n - mean) ** 2
        c = c0 + (c1 - c0) * t / steps
        ascends.append(n >= mean + c * math.sqrt(var))
        w = sgd.step(w, ref.grad(w + rho * unit(g), x, y) if ascends[-1] else g)
    assert [p == 2 for p in passes] == ascends and 0 < sum(ascends) < steps
    assert_matches(module, w, ref)


@pytest.mark.parametrize(
    ("cls", "option"), [(IntervalSAM, {"k": 1}), (StochasticSAM, {"probability": 1.0}), (AESAM, {"c_start": -1e9})]
)
def test_the_reductions_to_sam(cls, option):
    a, b = models("bn"), models("bn")
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.05, model=a, lr=LR, momentum=MOMENTUM)
    other = cls(b.parameters(), torch.optim.SGD, rho=0.05, model=b, lr=LR, momentum=MOMENTUM, **option)
    for x, y in batches("bn", 3):
        sam.step(closure_for(a, x, y))
        other.step(closure_for(b, x, y))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
