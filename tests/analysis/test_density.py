"""Stochastic Lanczos quadrature: normalisation and moments against the dense Hessian."""

from __future__ import annotations

import math

import torch

from sharpness.analysis import HessianOperator, MatrixOperator, gaussian_density, spectral_density
from sharpness.analysis.operators import random_vector

from .conftest import assert_state_equal, ce_loss, dense_hessian, state_copy


def trapezoid(y: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.trapezoid(y, x))


def test_density_integrates_to_one_and_matches_the_moments(bn_problem):
    model, batches = bn_problem.model, bn_problem.batches
    before = state_copy(model)
    h = dense_hessian(model, batches)
    n = h.shape[0]
    op = HessianOperator(model, ce_loss, batches, dtype=torch.float64)
    starts, iters = 6, 30
    sd = spectral_density(op, num_starts=starts, num_iters=iters, seed=4)
    assert op.num_matvecs == starts * iters
    assert_state_equal(model, before)
    grid, phi, sigma = sd.grid, sd.density, sd.sigma
    assert (phi >= 0).all()
    # The grid's spacing is sigma / 4 or finer, at which the trapezoidal rule is exact to rounding.
    assert abs(trapezoid(phi, grid) - 1.0) < 1e-9
    m1, m2 = trapezoid(grid * phi, grid), trapezoid(grid**2 * phi, grid)

    # The very starts SLQ used (documented: successive draws from the seeded generator).
    gen = torch.Generator().manual_seed(4)
    vs = [random_vector(n, gen, distribution="rademacher", dtype=torch.float64) for _ in range(starts)]
    vs = torch.stack([v / v.norm() for v in vs])
    q1 = ((vs @ h) * vs).sum(1)
    q2 = ((vs @ h @ h) * vs).sum(1)
    q3 = ((vs @ h @ h @ h) * vs).sum(1)
    scale = float(torch.linalg.matrix_norm(h, 2))
    # Gauss quadrature with 30 nodes is exact for polynomials of degree <= 59.
    assert abs(m1 - q1.mean()) < 1e-10 * scale
    assert abs(m2 - (q2.mean() + sigma**2)) < 1e-10 * scale**2
    for nodes, weights, q in zip(sd.nodes, sd.weights, q3, strict=True):
        assert abs(weights.sum() - 1.0) < 1e-12
        assert abs((weights * nodes**3).sum() - q) < 1e-10 * scale**3

    # Against the exact normalised traces: within 4 standard errors of the Rademacher estimator,
    # Var(v^T A v / n) = 2 (||A||_F^2 - sum_i A_ii^2) / n^2.
    for moment, a, extra in [(m1, h, 0.0), (m2, h @ h, sigma**2)]:
        var = 2 * (float((a**2).sum()) - float((torch.diagonal(a) ** 2).sum())) / n**2
        exact = float(torch.trace(a)) / n + extra
        assert abs(moment - exact) <= 4 * math.sqrt(var / starts)


def test_full_lanczos_nodes_are_the_eigenvalues():
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(25, 25, dtype=torch.float64, generator=gen))
    eigs = torch.linspace(-1.0, 4.0, 25, dtype=torch.float64)
    sd = spectral_density(MatrixOperator(q @ torch.diag(eigs) @ q.T), num_starts=1, num_iters=25, sigma=0.01)
    assert torch.allclose(sd.nodes[0], eigs, atol=1e-12)
    # Peaks of weight tau_i / (sigma sqrt(2 pi)) at each eigenvalue, Gaussians barely overlapping.
    at_eigs = gaussian_density(sd.nodes, sd.weights, sigma=0.01, grid=eigs)[1]
    expected = sd.weights[0] / (0.01 * math.sqrt(2 * math.pi))
    assert torch.allclose(at_eigs, expected, rtol=1e-12, atol=0)


def test_density_is_seeded_and_gaussian_starts_work(mlp_problem):
    op = HessianOperator(mlp_problem.model, ce_loss, mlp_problem.batches, dtype=torch.float64)
    a = spectral_density(op, num_starts=2, num_iters=10, seed=1)
    b = spectral_density(op, num_starts=2, num_iters=10, seed=1)
    assert torch.equal(a.density, b.density)
    g = spectral_density(op, num_starts=2, num_iters=10, seed=1, distribution="gaussian")
    assert abs(trapezoid(g.density, g.grid) - 1.0) < 1e-9
    assert not torch.equal(torch.cat(g.nodes), torch.cat(a.nodes))
