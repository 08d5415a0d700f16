"""Lanczos and power iteration against eigvalsh of dense Hessians."""

from __future__ import annotations

import pytest
import torch

from sharpness.analysis import (
    HessianOperator,
    MatrixOperator,
    lanczos,
    power_iteration,
    top_eigenpairs,
    tridiagonal_eigh,
)

from .conftest import assert_state_equal, ce_loss, dense_hessian, state_copy


def random_symmetric(n: int, seed: int) -> torch.Tensor:
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (a + a.T) / 2


def test_full_lanczos_recovers_the_whole_spectrum():
    a = random_symmetric(40, 0)
    run = lanczos(MatrixOperator(a), 40, keep_basis=True)
    theta, _ = tridiagonal_eigh(run.alpha, run.beta)
    assert torch.allclose(theta, torch.linalg.eigvalsh(a), rtol=0, atol=1e-12)
    q = run.basis
    assert torch.allclose(q @ q.T, torch.eye(40, dtype=torch.float64), atol=1e-13)
    t = torch.diag(run.alpha) + torch.diag(run.beta, 1) + torch.diag(run.beta, -1)
    assert torch.allclose(q @ a @ q.T, t, atol=1e-12)


def test_lanczos_stops_on_an_invariant_subspace():
    """A matrix with 3 distinct eigenvalues: the Krylov space closes after 3 steps."""
    q, _ = torch.linalg.qr(random_symmetric(30, 1))
    eigs = torch.tensor([5.0] * 10 + [1.0] * 10 + [-2.0] * 10, dtype=torch.float64)
    a = q @ torch.diag(eigs) @ q.T
    run = lanczos(MatrixOperator(a), 20)
    assert run.alpha.numel() == 3 and run.beta_last == 0.0
    theta, _ = tridiagonal_eigh(run.alpha, run.beta)
    assert torch.allclose(theta, torch.tensor([-2.0, 1.0, 5.0], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(
    ("problem", "bn_mode"), [("mlp_problem", "eval"), ("bn_problem", "eval"), ("bn_problem", "train")]
)
def test_top_eigenvalues_match_eigvalsh(problem, bn_mode, request):
    prob = request.getfixturevalue(problem)
    before = state_copy(prob.model)
    h = dense_hessian(prob.model, prob.batches, bn_mode)
    exact = torch.linalg.eigvalsh(h).flip(0)
    op = HessianOperator(prob.model, ce_loss, prob.batches, dtype=torch.float64, bn_mode=bn_mode)
    res = top_eigenpairs(op, 5, num_iters=60, eigenvectors=True)
    assert res.num_iters == 60 and op.num_matvecs == 60
    # Residual bound: each Ritz value lies within its residual of an eigenvalue; here they converged.
    assert torch.all(res.residuals < 1e-6 * exact[0])
    assert torch.all((res.eigenvalues - exact[:5]).abs() <= res.residuals + 1e-12)
    assert torch.allclose(res.eigenvalues, exact[:5], rtol=1e-10, atol=0)
    y = res.eigenvectors
    assert y.shape == (5, op.dim)
    assert torch.allclose(y @ y.T, torch.eye(5, dtype=torch.float64), atol=1e-10)
    r = torch.linalg.vector_norm(y @ h - res.eigenvalues[:, None] * y, dim=1)
    assert torch.allclose(r, res.residuals, rtol=0, atol=1e-10)
    assert_state_equal(prob.model, before)


def nearest_distance(values: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (values[:, None] - exact[None, :]).abs().min(dim=1).values


def test_top_eigenvalues_float32(bn_problem):
    model, batches = bn_problem.model, bn_problem.batches
    before = state_copy(model)
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches)).flip(0)
    op = HessianOperator(model, ce_loss, batches)
    res = top_eigenpairs(op, 5, num_iters=60)
    assert res.residual_kind == "explicit" and op.num_matvecs == 60 + 5  # one extra product per pair
    assert torch.allclose(res.eigenvalues, exact[:5], rtol=1e-5, atol=0)
    assert torch.all(nearest_distance(res.eigenvalues, exact) <= res.residuals)
    assert_state_equal(model, before)


class CancellingOperator:
    """``(A v + c v) - c v`` in float32: products whose rounding (about eps32 * c) is far above
    eps32 * ||A||, as in float32 Hessian-vector products that sum large terms of both signs."""

    def __init__(self, a: torch.Tensor, c: float) -> None:
        self.a, self.c = a, c
        self.dim, self.dtype, self.device = a.shape[0], a.dtype, a.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return (self.a @ v + self.c * v) - self.c * v


def test_float32_residuals_bound_the_error_against_eigvalsh(bn_problem):
    """The reported residuals bound the distance to the exact spectrum (eigvalsh, float64) also
    when float32 products are inexact; the recurrence's beta_m |s_mi| (floored at eps ||T||)
    does not see the products' rounding and under-reports it."""
    a = dense_hessian(bn_problem.model, bn_problem.batches).float()
    exact = torch.linalg.eigvalsh(a.double())
    op = CancellingOperator(a, 1000.0)
    res = top_eigenpairs(op, 5, num_iters=60, eigenvectors=True)
    assert res.residual_kind == "explicit"
    err = nearest_distance(res.eigenvalues, exact)
    assert torch.all(err <= res.residuals)
    y = res.eigenvectors.double()
    y = y / torch.linalg.vector_norm(y, dim=1, keepdim=True)
    true = torch.linalg.vector_norm(y @ a.double() - res.eigenvalues[:, None] * y, dim=1)
    assert torch.all(res.residuals >= 0.5 * true)  # same order as the exact residuals
    recurrence = top_eigenpairs(op, 5, num_iters=60, residuals="lanczos")
    assert torch.equal(recurrence.eigenvalues, res.eigenvalues)
    assert torch.any(err > recurrence.residuals)  # why float32 gets explicit residuals
    with pytest.raises(ValueError):
        top_eigenpairs(op, 2, residuals="exact")


def test_unconverged_ritz_values_respect_their_residual_bound(bn_problem):
    h = dense_hessian(bn_problem.model, bn_problem.batches)
    exact = torch.linalg.eigvalsh(h)
    res = top_eigenpairs(MatrixOperator(h), 5, num_iters=20)
    assert res.residuals.max() > 1e-4  # not converged: the bound is what is being tested
    for theta, r in zip(res.eigenvalues, res.residuals, strict=True):
        assert (exact - theta).abs().min() <= r + 1e-12


def test_lanczos_is_seeded(mlp_problem):
    op = HessianOperator(mlp_problem.model, ce_loss, mlp_problem.batches, dtype=torch.float64)
    a, b = top_eigenpairs(op, 3, num_iters=15, seed=7), top_eigenpairs(op, 3, num_iters=15, seed=7)
    c = top_eigenpairs(op, 3, num_iters=15, seed=8)
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert not torch.equal(a.eigenvalues, c.eigenvalues)


def test_power_iteration_agrees_with_dense_and_lanczos(bn_problem):
    model, batches = bn_problem.model, bn_problem.batches
    before = state_copy(model)
    h = dense_hessian(model, batches)
    exact = torch.linalg.eigvalsh(h)
    dominant = exact[exact.abs().argmax()]
    assert dominant > 0  # so power iteration and Lanczos must find the same eigenvalue
    op = HessianOperator(model, ce_loss, batches, dtype=torch.float64)
    pw = power_iteration(op, max_iters=500, tol=1e-7)
    assert pw.converged and pw.num_iters < 500
    assert abs(pw.eigenvalue - dominant) <= 1e-9 * dominant
    assert abs(pw.eigenvalue - top_eigenpairs(op, 1, num_iters=60).eigenvalues[0]) <= 1e-9 * dominant
    v = pw.eigenvector
    assert torch.linalg.vector_norm(h @ v - pw.eigenvalue * v) <= pw.residual * (1 + 1e-6) + 1e-12
    assert_state_equal(model, before)


def test_power_iteration_finds_the_largest_magnitude():
    q, _ = torch.linalg.qr(random_symmetric(20, 2))
    eigs = torch.linspace(-1.0, 0.5, 20, dtype=torch.float64)
    eigs[0] = -3.0
    pw = power_iteration(MatrixOperator(q @ torch.diag(eigs) @ q.T), max_iters=200, tol=1e-8)
    assert pw.converged and abs(pw.eigenvalue + 3.0) < 1e-10
    capped = power_iteration(MatrixOperator(q @ torch.diag(eigs) @ q.T), max_iters=3, tol=0.0)
    assert not capped.converged and capped.num_iters == 3
