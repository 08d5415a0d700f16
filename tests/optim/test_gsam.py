"""GSAM against a float64 reference written from Algorithm 1 of Zhuang et al. (2022)."""

from __future__ import annotations

import pytest
import torch

from sharpness import GSAM, SAM

from ._reference import (
    LR,
    MOMENTUM,
    SGD,
    WD,
    Model,
    assert_matches,
    batches,
    closure_for,
    flat_params,
    models,
    orthogonal,
    unit,
)


def _schedule(opt, steps):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)  # lr from LR down to LR / steps


@pytest.mark.parametrize("net", ["mlp", "bn"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_gsam_equals_the_reference_with_a_radius_that_follows_the_learning_rate(net, alpha):
    steps, rho_max, rho_min = 4, 0.1, 0.02
    module = models(net)
    ref = Model(module)
    data = batches(net, steps)
    opt = GSAM(
        module.parameters(),
        torch.optim.SGD,
        rho=rho_max,
        rho_min=rho_min,
        alpha=alpha,
        model=module,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WD,
    )
    schedule = _schedule(opt, steps)
    for x, y in data:
        opt.step(closure_for(module, x, y))
        schedule.step()

    w, sgd = flat_params(ref.module), SGD()
    for t, (x, y) in enumerate(data):
        lr = LR * (1.0 - t / steps)
        sgd.lr = lr
        rho_t = rho_min + (rho_max - rho_min) * lr / LR  # lr_max = LR, lr_min = 0
        g = ref.grad(w, x, y, update_buffers=True)
        g_p = ref.grad(w + rho_t * unit(g), x, y)
        w = sgd.step(w, g_p - alpha * orthogonal(g, g_p))
    assert_matches(module, w, ref)


def test_gsam_step_is_orthogonal_correction_of_the_perturbed_gradient():
    """d - g_p is parallel to the clean gradient's component orthogonal to g_p, so <d - g_p, g_p> = 0."""
    from .conftest import Recorder, batch, mlp

    module = mlp()
    x, y = batch()
    plain = SAM(module.parameters(), Recorder, rho=0.05)
    plain.step(closure_for(module, x, y))
    g_p = torch.cat([t.flatten() for t in plain.base_optimizer.seen[0]])
    gsam = GSAM(module.parameters(), Recorder, rho=0.05, alpha=0.5)
    gsam.step(closure_for(module, x, y))
    d = torch.cat([t.flatten() for t in gsam.base_optimizer.seen[0]])
    assert abs(float((d - g_p) @ g_p)) < 1e-12 * float(g_p @ g_p)
    assert float((d - g_p).norm()) > 1e-6


def test_alpha_zero_and_constant_radius_is_sam_exactly():
    a, b = models("bn"), models("bn")
    data = batches("bn", 3)
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.05, model=a, lr=LR, momentum=MOMENTUM)
    gsam = GSAM(b.parameters(), torch.optim.SGD, rho=0.05, alpha=0.0, model=b, lr=LR, momentum=MOMENTUM)
    for x, y in data:
        sam.step(closure_for(a, x, y))
        gsam.step(closure_for(b, x, y))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_radius_reads_each_groups_learning_rate_and_is_never_negative():
    module = models("mlp")
    opt = GSAM(module.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.05, lr_min=0.01, lr=0.1)
    group = opt.param_groups[0]
    assert opt._radius(group) == pytest.approx(0.1)
    group["lr"] = 0.055
    assert opt._radius(group) == pytest.approx(0.075)
    group["lr"] = 0.0  # below lr_min, as in a warm-up: below rho_min, unclamped except at 0
    assert opt._radius(group) == pytest.approx(0.05 - 0.05 * 0.01 / 0.09)
    with pytest.raises(ValueError, match="rho_min"):
        GSAM(module.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.2, lr=0.1)
