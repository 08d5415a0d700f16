"""The random-direction control (SAM paper, Appendix C.5): one pass at w + rho z/||z||, z ~ N(0, I)."""

from __future__ import annotations

import pytest
import torch

from sharpness import RandomDirectionSAM

from .conftest import Recorder


def _perturbations(seed, steps=20, dims=(3, 50)):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(d, dtype=torch.float64, generator=gen)) for d in dims]
    opt = RandomDirectionSAM(params, Recorder, rho=0.2, seed=seed)
    count, eps = [0], []

    def closure():  # L(w) = |w|^2 / 2, so the gradient at w + eps is w + eps
        count[0] += 1
        opt.zero_grad()
        loss = 0.5 * sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(steps):
        w = torch.cat([p.detach().flatten() for p in params])
        opt.step(closure)
        eps.append(torch.cat([g.flatten() for g in opt.base_optimizer.seen[-1]]) - w)
    return torch.stack(eps), count[0]


def test_each_step_takes_one_pass_at_a_fresh_random_point_of_norm_rho():
    eps, passes = _perturbations(seed=0)
    assert passes == 20
    torch.testing.assert_close(eps.norm(dim=1), torch.full((20,), 0.2, dtype=torch.float64), rtol=1e-12, atol=0)
    cos = (eps @ eps.T) / 0.04
    assert float(cos.fill_diagonal_(0).abs().max()) < 0.6  # 53 dimensions: distinct draws are far from parallel
    # isotropic: each coordinate's mean over the draws is near 0 (a fixed or biased direction would not be)
    assert float(eps.mean(0).abs().max()) < 0.1


def test_the_draws_are_reproducible_from_the_seed_and_differ_between_seeds():
    a, _ = _perturbations(seed=5)
    b, _ = _perturbations(seed=5)
    c, _ = _perturbations(seed=6)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("net", ["mlp", "bn"])
def test_random_direction_equals_the_reference_given_its_generator(net):
    """w <- base(w, grad L(w + rho z/|z|)), z the standard normal draw of the seeded generator, one per step."""
    from ._reference import LR, MOMENTUM, SGD, WD, Model, assert_matches, batches, closure_for, flat_params, models

    module = models(net)
    ref = Model(module)
    data = batches(net, 4)
    opt = RandomDirectionSAM(
        module.parameters(), torch.optim.SGD, rho=0.2, seed=11, model=module, lr=LR, momentum=MOMENTUM, weight_decay=WD
    )
    for x, y in data:
        opt.step(closure_for(module, x, y))
    noise = torch.Generator().manual_seed(11)
    w, sgd = flat_params(ref.module), SGD()
    for x, y in data:
        z = torch.randn(w.numel(), generator=noise, dtype=torch.float64)
        w = sgd.step(w, ref.grad(w + 0.2 * z / z.norm(), x, y, update_buffers=True))
    assert_matches(module, w, ref)
