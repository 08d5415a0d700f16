"""m-sharpness on losses whose maximum over the ball is known in closed form."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sharpness.analysis import m_sharpness

from .conftest import assert_state_equal, ce_loss, set_mode, state_copy


class Quadratic(nn.Module):
    """L_S(w) = 1/2 w^T A w + mean_{x in S} x^T w, so L_S(w + e) - L_S(w) = g^T e + 1/2 e^T A e."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w + (x @ self.w).mean()


def quad_loss(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])


def data(sizes: list[int], dim: int, seed: int) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, dim, generator=gen, dtype=torch.float64),) for n in sizes]


def subset_means(batches, m: int) -> list[torch.Tensor]:
    return [x[i : i + m].mean(0) for (x,) in batches for i in range(0, x.shape[0] - m + 1, m)]


@pytest.mark.parametrize(("p", "q"), [(2.0, 2.0), (math.inf, 1.0), (3.0, 1.5)])
def test_linear_loss_equals_rho_times_dual_norm(p, q):
    """For a linear loss the first-order ascent is exact: max = rho ||g_S||_q."""
    dim, rho, m = 5, 0.3, 4
    model = Quadratic(torch.zeros(dim, dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64))
    batches = data([10, 8], dim, seed=0)
    before = state_copy(model)
    out = m_sharpness(model, quad_loss, batches, m=m, rho=rho, p=p)
    assert_state_equal(model, before)
    expected = [rho * float(torch.linalg.vector_norm(g, q)) for g in subset_means(batches, m)]
    assert out["num_subsets"] == 4 and out["dropped_examples"] == 2 + 0
    assert out["per_subset"] == pytest.approx(expected, rel=1e-6)
    assert out["sharpness"] == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_isotropic_quadratic_is_exact_at_first_order():
    """A = cI: g^T e + c/2 |e|^2 is maximised by e = rho g/|g|, giving rho |g| + c rho^2 / 2."""
    dim, rho, c, m = 6, 0.5, 2.0, 3
    model = Quadratic(c * torch.eye(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64))
    batches = data([9, 7], dim, seed=1)
    out = m_sharpness(model, quad_loss, batches, m=m, rho=rho)
    w = model.w.detach()
    expected = [rho * float((c * w + g).norm()) + c * rho**2 / 2 for g in subset_means(batches, m)]
    assert out["per_subset"] == pytest.approx(expected, rel=1e-6)
    assert out["dropped_examples"] == 1


def trust_region_max(a: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """max_{|e| <= rho} g^T e + 1/2 e^T A e for PSD A: e = (lam I - A)^-1 g with |e| = rho."""
    lam_a, u = torch.linalg.eigh(a)
    gu = u.T @ g
    lo, hi = float(lam_a[-1]), float(lam_a[-1]) + float(g.norm()) / rho
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((gu / (mid - lam_a)).norm()) > rho else (lo, mid)
    e = u @ (gu / (hi - lam_a))
    return float(g @ e + 0.5 * e @ a @ e)


def test_ascent_steps_reach_the_exact_maximum_of_a_quadratic():
    """With g mostly along flat directions the first-order step is poor; more steps fix it."""
    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    a = u @ torch.diag(torch.tensor([10.0, 1.0, 0.5, 0.1], dtype=torch.float64)) @ u.T
    x = (u @ torch.tensor([0.2, 1.0, 1.0, 1.0], dtype=torch.float64)).expand(4, 4).clone()
    model = Quadratic(a, torch.zeros(4, dtype=torch.float64))
    rho = 1.0
    exact = trust_region_max(a, x[0], rho)
    before = state_copy(model)
    one = m_sharpness(model, quad_loss, [(x,)], m=4, rho=rho)["sharpness"]
    cg = m_sharpness(model, quad_loss, [(x,)], m=4, rho=rho, ascent_steps=40)["sharpness"]
    pgd = m_sharpness(model, quad_loss, [(x,)], m=4, rho=rho, ascent_steps=40, step_size=0.5)["sharpness"]
    assert_state_equal(model, before)
    assert one < 0.8 * exact
    assert one <= cg <= exact + 1e-12 and one <= pgd <= exact + 1e-12
    assert cg == pytest.approx(exact, rel=1e-6)
    assert pgd == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_batchnorm_network_against_a_hand_computed_reference(bn_problem, bn_mode):
    model = bn_problem.model.double()
    x, y = bn_problem.batches[0]
    batches = [(x.double(), y)]
    model.train()  # a training flag that must come back
    before = state_copy(model)
    out = m_sharpness(model, ce_loss, batches, m=3, rho=0.05, bn_mode=bn_mode)
    assert_state_equal(model, before)
    expected = []
    for i in (0, 3):
        ref = copy.deepcopy(model)
        set_mode(ref, bn_mode)
        sub = (batches[0][0][i : i + 3], y[i : i + 3])
        loss = ce_loss(ref, sub)
        loss.backward()
        gnorm = math.sqrt(sum(float((p.grad**2).sum()) for p in ref.parameters()))
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(p.grad, alpha=0.05 / gnorm)
            expected.append(float(ce_loss(ref, sub)) - float(loss))
    assert out["per_subset"] == pytest.approx(expected, rel=1e-6)
    assert out["bn_mode"] == bn_mode


def test_modes_differ_and_max_subsets(bn_problem):
    model, batches = bn_problem.model, bn_problem.batches
    before = state_copy(model)
    ev = m_sharpness(model, ce_loss, batches, m=2, rho=0.1, bn_mode="eval", progress=False)
    tr = m_sharpness(model, ce_loss, batches, m=2, rho=0.1, bn_mode="train", max_subsets=5, ascent_steps=2)
    assert_state_equal(model, before)
    assert ev["num_subsets"] == 8 and tr["num_subsets"] == 5
    assert ev["per_subset"][:5] != pytest.approx(tr["per_subset"], rel=1e-3)
    assert all(s > 0 for s in ev["per_subset"])
    with pytest.raises(ValueError):
        m_sharpness(model, ce_loss, batches, m=100, rho=0.1)
