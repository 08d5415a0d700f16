"""Hutchinson's trace: confidence-interval coverage over seeds, stopping rule, closed forms."""

from __future__ import annotations

import math

import torch

from sharpness.analysis import HessianOperator, MatrixOperator, hutchinson_trace

from .conftest import assert_state_equal, ce_loss, dense_hessian, state_copy


def test_interval_covers_the_exact_trace_at_its_stated_rate(bn_problem):
    h = dense_hessian(bn_problem.model, bn_problem.batches)
    exact = float(torch.trace(h))
    op = MatrixOperator(h)  # the same operator as a dense matrix, so 40 runs are cheap
    runs = [hutchinson_trace(op, rtol=0.3, confidence=0.95, min_samples=10, max_samples=100, seed=s) for s in range(40)]
    covered = sum(r.ci_low <= exact <= r.ci_high for r in runs)
    assert covered >= 34  # >= 85% at a nominal 95%
    # The stopping rule is exercised both ways, and obeyed when it fires.
    assert any(r.converged for r in runs) and any(not r.converged for r in runs)
    for r in runs:
        half = (r.ci_high - r.ci_low) / 2
        if r.converged:
            assert 10 <= r.num_samples < 100 and half <= 0.3 * abs(r.estimate)
        else:
            assert r.num_samples == 100 and half > 0.3 * abs(r.estimate)
        assert math.isclose(r.estimate, sum(r.samples) / len(r.samples), rel_tol=1e-12)


def test_model_operator_gives_the_same_samples(bn_problem):
    model, batches = bn_problem.model, bn_problem.batches
    before = state_copy(model)
    h = dense_hessian(model, batches, "train")
    op = HessianOperator(model, ce_loss, batches, bn_mode="train", dtype=torch.float64)
    ours = hutchinson_trace(op, rtol=0.0, min_samples=5, max_samples=12, seed=3)
    ref = hutchinson_trace(MatrixOperator(h), rtol=0.0, min_samples=5, max_samples=12, seed=3)
    assert ours.num_samples == 12 and not ours.converged
    assert torch.allclose(torch.tensor(ours.samples), torch.tensor(ref.samples), rtol=1e-12, atol=1e-12)
    assert_state_equal(model, before)


def test_diagonal_operator_has_zero_variance():
    """z^T D z = tr D for every Rademacher z: the interval collapses after min_samples."""
    d = torch.diag(torch.linspace(-2.0, 5.0, 50, dtype=torch.float64))
    r = hutchinson_trace(MatrixOperator(d), rtol=1e-6, min_samples=4, max_samples=50, seed=0)
    assert r.converged and r.num_samples == 4
    assert abs(r.estimate - float(torch.trace(d))) < 1e-12 and r.ci_high - r.ci_low < 1e-10


def test_interval_is_the_student_t_interval():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, dtype=torch.float64, generator=gen)
    r = hutchinson_trace(MatrixOperator(a + a.T), rtol=0.0, min_samples=2, max_samples=8, confidence=0.9, seed=2)
    x = torch.tensor(r.samples, dtype=torch.float64)
    stderr = float(x.std()) / math.sqrt(8)
    t_95 = 1.894578605  # Student t, 7 degrees of freedom, 0.95 quantile
    assert math.isclose(r.stderr, stderr, rel_tol=1e-12)
    assert math.isclose(r.ci_high - r.estimate, t_95 * stderr, rel_tol=1e-8)
