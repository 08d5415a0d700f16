"""eps-hat of eq. (2) against a float64 reference written directly from the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch

from sharpness.optim.perturbation import adaptive_scale, dual_exponent, perturbation

SHAPES = [(7, 3), (5,), (2, 3, 4), (1,)]


def _random(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def _reference(grads, rho, p, params=None, eta=0.01):
    """eq. (2) in float64 on the flattened vector; ASAM: eps = rho T sign(Tg)|Tg|^(q-1) / ||Tg||_q^(q-1)."""
    g = torch.cat([t.double().flatten() for t in grads])
    t = torch.ones_like(g) if params is None else torch.cat([w.double().flatten().abs() + eta for w in params])
    s = t * g
    if math.isinf(p):
        eps = rho * t * torch.sign(s)
    else:
        q = p / (p - 1)
        eps = rho * t * torch.sign(s) * s.abs() ** (q - 1) / (s.abs() ** q).sum() ** (1 / p)
    return eps


@pytest.mark.parametrize("p", [2.0, math.inf, 1.5, 3.0])
@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_float64_reference(p, adaptive):
    grads = _random(0)
    params = _random(1) if adaptive else None
    scale = adaptive_scale(params, 0.01) if adaptive else None
    eps, _ = perturbation(grads, 0.05, p, scale)
    got = torch.cat([e.double().flatten() for e in eps])
    torch.testing.assert_close(got, _reference(grads, 0.05, p, params), rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("p", [2.0, math.inf, 1.5, 3.0])
def test_eps_is_on_the_sphere_and_maximises_the_linearisation(p):
    """||eps||_p = rho and eps.g = rho ||g||_q (Hoelder's equality): eq. (2) solves the linearised problem."""
    grads = _random(2, torch.float64)
    rho = 0.3
    eps, dual = perturbation(grads, rho, p)
    flat_eps = torch.cat([e.flatten() for e in eps])
    flat_g = torch.cat([g.flatten() for g in grads])
    q = dual_exponent(p)
    torch.testing.assert_close(torch.linalg.vector_norm(flat_eps, p), torch.tensor(rho, dtype=torch.float64))
    torch.testing.assert_close(dual, torch.linalg.vector_norm(flat_g, q))
    torch.testing.assert_close(flat_eps @ flat_g, rho * torch.linalg.vector_norm(flat_g, q))
    # no random point of the ball does better
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        d = torch.randn(flat_g.shape, generator=gen, dtype=torch.float64)
        d = rho * d / torch.linalg.vector_norm(d, p)
        assert d @ flat_g <= flat_eps @ flat_g + 1e-12


def test_per_tensor_radius_scales_each_share():
    grads = _random(4, torch.float64)
    radii = [0.1, 0.0, 0.2, 0.05]
    eps, _ = perturbation(grads, radii, 2.0)
    unit, _ = perturbation(grads, 1.0, 2.0)
    for e, u, r in zip(eps, unit, radii, strict=True):
        torch.testing.assert_close(e, r * u)


def test_partial_scale_means_unit_scale_for_none_entries():
    grads = _random(5, torch.float64)
    params = _random(6, torch.float64)
    full = adaptive_scale(params, 0.01)
    partial = [full[0], None, full[2], None]
    ones = [full[0], torch.ones_like(grads[1]), full[2], torch.ones_like(grads[3])]
    for a, b in zip(perturbation(grads, 0.1, 2.0, partial).eps, perturbation(grads, 0.1, 2.0, ones).eps, strict=True):
        torch.testing.assert_close(a, b)


def test_zero_gradient_gives_zero_perturbation():
    eps, dual = perturbation([torch.zeros(3), torch.zeros(2, 2)], 0.05, 2.0)
    assert dual.item() == 0.0
    assert all(torch.equal(e, torch.zeros_like(e)) for e in eps)


def test_nonfinite_gradient_shows_in_the_dual_norm():
    _, dual = perturbation([torch.tensor([1.0, float("nan")]), torch.ones(2)], 0.05, 2.0)
    assert not torch.isfinite(dual)
    _, dual = perturbation([torch.tensor([float("inf")]), torch.ones(2)], 0.05, 2.0)
    assert not torch.isfinite(dual)


def test_low_precision_gradients_keep_their_dtype_and_norm_accumulates_in_float64():
    grads = [g.bfloat16() for g in _random(7)]
    eps, dual = perturbation(grads, 0.05, 2.0)
    assert all(e.dtype == torch.bfloat16 for e in eps)
    assert dual.dtype == torch.float64
    torch.testing.assert_close(dual, torch.cat([g.double().flatten() for g in grads]).norm())


@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
@pytest.mark.parametrize("magnitude", [1e-36, 1e-25, 1e-20, 1.0, 1e19, 1e30])
def test_tiny_and_huge_float32_gradients_give_an_exact_radius(p, magnitude):
    """Squares of these gradients leave float32's range; the norm must not underflow to 0 or overflow to inf."""
    grads = [(g * magnitude).float() for g in _random(9, torch.float64)]
    assert all(torch.isfinite(g).all() and (g != 0).all() for g in grads)
    eps, dual = perturbation(grads, 0.05, p)
    assert torch.isfinite(dual)
    flat = torch.cat([e.double().flatten() for e in eps])
    torch.testing.assert_close(flat.norm(p), torch.tensor(0.05, dtype=torch.float64), rtol=1e-5, atol=0)


def test_a_zero_gradient_gives_a_zero_perturbation():
    eps, dual = perturbation([torch.zeros(3), torch.zeros(2, 2)], 0.05, 2.0)
    assert dual == 0 and all(torch.equal(e, torch.zeros_like(e)) for e in eps)


def test_differentiable_for_the_second_order_term():
    grads = [g.requires_grad_() for g in _random(8, torch.float64)]

    def f(*gs):
        return torch.cat([e.flatten() for e in perturbation(list(gs), 0.05, 3.0).eps])

    assert torch.autograd.gradcheck(f, tuple(grads))


@pytest.mark.parametrize("p", [1.0, 0.5, -2.0, float("nan")])
def test_bad_p_is_rejected(p):
    with pytest.raises(ValueError):
        dual_exponent(p)


def test_dual_exponent():
    assert dual_exponent(2.0) == 2.0
    assert dual_exponent(math.inf) == 1.0
    assert dual_exponent(3.0) == 1.5


def test_empty_and_mismatched_inputs():
    with pytest.raises(ValueError):
        perturbation([], 0.05)
    with pytest.raises(ValueError, match="radii"):
        perturbation(_random(9), [0.1, 0.2])
    with pytest.raises(ValueError, match="scales"):
        perturbation(_random(9), 0.1, 2.0, [None])


@pytest.mark.parametrize("p", [1.1, 1.5, 3.0, 8.0])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 1e6])
def test_no_underflow_or_overflow_for_tiny_or_loss_scaled_gradients(p, magnitude):
    """eps-hat is homogeneous of degree 0 in g: the same for g * 1e-6 and for a GradScaler-scaled g * 1e6."""
    grads = [g * magnitude for g in _random(10)]
    eps, dual = perturbation(grads, 0.05, p)
    flat = torch.cat([e.double().flatten() for e in eps])
    assert torch.isfinite(dual)
    torch.testing.assert_close(
        torch.linalg.vector_norm(flat, p), torch.tensor(0.05, dtype=torch.float64), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(flat, _reference(_random(10), 0.05, p), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("p", [2.0, math.inf, 3.0])
def test_a_nonfinite_gradient_makes_every_entry_nan(p):
    eps, _ = perturbation([torch.tensor([1.0, float("inf")]), torch.ones(2)], 0.05, p)
    assert all(torch.isnan(e).all() for e in eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_normaliser_is_divided_in_the_gradients_dtype(dtype, monkeypatch):
    """CUDA's one-launch ``_foreach_div(tensors, scalar)`` needs the scalar in the tensors' dtype; for float32
    the result is bitwise that of a float64 scalar (the kernel casts it anyway)."""
    grads = _random(3, dtype)
    expected, _ = perturbation(grads, 0.05, 2.0)
    seen = []
    real = torch._foreach_div

    def recording(tensors, other):
        seen.append((other.dtype, {t.dtype for t in tensors}))
        return real(tensors, other)

    monkeypatch.setattr(torch, "_foreach_div", recording)
    eps, _ = perturbation(grads, 0.05, 2.0)
    assert seen == [(dtype, {dtype})]
    monkeypatch.undo()
    as_float64 = real(grads, (torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])) / 0.05))
    for a, b, c in zip(eps, expected, as_float64, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
