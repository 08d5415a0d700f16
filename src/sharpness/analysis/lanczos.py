r"""Lanczos iteration with full reorthogonalisation, and the top eigenpairs it gives.

Starting from a unit vector :math:`q_1`, :math:`m` steps of Lanczos build an orthonormal basis
:math:`Q_m = [q_1, \dots, q_m]` of the Krylov space :math:`\mathcal{K}_m(H, q_1)` and the
tridiagonal :math:`T_m = Q_m^\top H Q_m` (diagonal :math:`\alpha_j`, off-diagonal
:math:`\beta_j`), with :math:`H Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top` (Golub & Van Loan,
*Matrix Computations*, §10.1). The eigenvalues of :math:`T_m` (Ritz values) approximate the
extremal eigenvalues of :math:`H` after far fewer products than power iteration needs.

In floating point the :math:`q_j` lose orthogonality as Ritz values converge, which creates
spurious copies ("ghosts") of converged eigenvalues; full reorthogonalisation against all
previous :math:`q_j` (classical Gram–Schmidt applied twice, as in Ghorbani et al. 2019 and
PyHessian) prevents this at :math:`O(mn)` extra work per step. The small problem
:math:`T_m = S \Theta S^\top` is solved in float64 whatever the operator's dtype.

For a Ritz pair :math:`(\theta_i, y_i = Q_m s_i)`, some eigenvalue of :math:`H` lies within
:math:`\|H y_i - \theta_i y_i\| / \|y_i\|` of :math:`\theta_i` (Parlett, *The Symmetric Eigenvalue
Problem*, Thm 4.5.1). :func:`top_eigenpairs` reports that residual in one of two ways:

* ``"lanczos"``: :math:`\beta_m |e_m^\top s_i|`, free, equal to the residual in exact arithmetic
  and floored at :math:`\varepsilon\,\|T_m\|`. This is a certificate only when the products
  themselves are accurate to about that level, i.e. for float64 products. Float32
  Hessian-vector products carry rounding errors well above :math:`\varepsilon_{32}\|H\|`
  (double back-propagation sums many terms), and the recurrence never sees them: on a small
  trained CNN the true residuals were 17-30 times this value.
* ``"explicit"``: :math:`\|\mathrm{op}(y_i) - \theta_i y_i\| / \|y_i\|` from one extra product per
  Ritz pair, evaluated in float64 from the operator's output. It contains the rounding of the
  products, so it bounds the error against the operator *as computed*; against the exact
  Hessian it can be off by the rounding error of one product, which is of the same size (see
  ``docs/analysis.md``). The default for any dtype other than float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sharpness.analysis.operators import LinearOperator
from sharpness.analysis.probes import probe_generator, random_vector
from sharpness.analysis.progress import progress_bar

__all__ = ["LanczosResult", "EigenResult", "lanczos", "tridiagonal_eigh", "top_eigenpairs"]


class LanczosResult(NamedTuple):
    """The tridiagonal :math:`T_m` and (optionally) the basis of a Lanczos run."""

    alpha: Tensor
    """Diagonal :math:`\\alpha_1..\\alpha_m`, float64 on the CPU."""
    beta: Tensor
    """Off-diagonal :math:`\\beta_1..\\beta_{m-1}`, float64 on the CPU."""
    beta_last: float
    """:math:`\\beta_m = \\|r_m\\|`, the norm of the last residual (0 when the Krylov space closed)."""
    basis: Tensor | None
    """:math:`Q_m^\\top` as an ``(m, dim)`` tensor in the operator's dtype, when requested."""


class EigenResult(NamedTuple):
    """Top Ritz pairs, largest first."""

    eigenvalues: Tensor
    """float64, descending."""
    residuals: Tensor
    """float64, :math:`\\|Hy_i - \\theta_i y_i\\|` for each Ritz pair, computed as ``residual_kind`` says."""
    eigenvectors: Tensor | None
    """``(k, dim)`` unit Ritz vectors in the operator's dtype, when requested."""
    num_iters: int
    """Lanczos steps taken (fewer than asked when an invariant subspace was found)."""
    residual_kind: str = "lanczos"
    """``"lanczos"`` (from the recurrence) or ``"explicit"`` (one extra product per pair); see the module."""


def lanczos(
    op: LinearOperator,
    num_iters: int,
    *,
    start: Tensor | None = None,
    seed: int = 0,
    distribution: str = "gaussian",
    keep_basis: bool = False,
    progress: bool = False,
) -> LanczosResult:
    """Run ``num_iters`` Lanczos steps with full reorthogonalisation.

    Args:
        op: a symmetric operator.
        num_iters: steps :math:`m` (capped at ``op.dim``); one operator product each.
        start: the starting vector (normalised here); default: random from ``seed``, drawn on
            the operator's device (:mod:`sharpness.analysis.probes`).
        seed: seed of the random start.
        distribution: ``"gaussian"`` or ``"rademacher"`` entries for the random start.
        keep_basis: also return the basis (needed for Ritz vectors).
        progress: show a progress bar.

    The iteration stops early, with ``beta_last = 0``, when the residual vanishes to rounding
    (``H`` restricted to the Krylov space is then exact).
    """
    m = min(int(num_iters), op.dim)
    if m < 1:
        raise ValueError("num_iters must be >= 1")
    if start is None:
        start = random_vector(op.dim, probe_generator(seed, op.device), distribution=distribution, dtype=op.dtype)
    q = start.to(device=op.device, dtype=op.dtype)
    q = q / torch.linalg.vector_norm(q)
    basis = torch.empty(m, op.dim, dtype=op.dtype, device=op.device)
    alphas: list[float] = []
    betas: list[float] = []
    norm_bound = 0.0
    tiny = 100 * torch.finfo(op.dtype).eps
    beta_last = 0.0
    for j in progress_bar(range(m), desc="lanczos", enabled=progress):
        basis[j] = q
        w = op.matvec(q)
        alpha = torch.dot(q, w)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        # Classical Gram-Schmidt twice is enough to keep the basis orthogonal to working precision.
        for _ in range(2):
            q_prev = basis[: j + 1]
            w = w - q_prev.T @ (q_prev @ w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(float(alpha))
        norm_bound = max(norm_bound, abs(alphas[-1]) + beta + (betas[-1] if betas else 0.0))
        if beta <= tiny * norm_bound:
            beta_last = 0.0
            basis = basis[: j + 1]
            break
        if j == m - 1:
            beta_last = beta
            break
        betas.append(beta)
        q = w / beta
    return LanczosResult(
        alpha=torch.tensor(alphas, dtype=torch.float64),
        beta=torch.tensor(betas, dtype=torch.float64),
        beta_last=beta_last,
        basis=basis if keep_basis else None,
    )


def tridiagonal_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric tridiagonal matrix with
    diagonal ``alpha`` and off-diagonal ``beta``, computed in float64."""
    alpha = alpha.to(torch.float64).cpu()
    beta = beta.to(torch.float64).cpu()
    if beta.numel() != alpha.numel() - 1:
        raise ValueError(f"need len(beta) == len(alpha) - 1, got {beta.numel()} and {alpha.numel()}")
    t = torch.diag(alpha)
    if beta.numel() > 0:
        t = t + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(t)


def _residual_kind(residuals: str, dtype: torch.dtype) -> str:
    if residuals == "auto":
        return "lanczos" if dtype == torch.float64 else "explicit"
    if residuals not in ("lanczos", "explicit"):
        raise ValueError(f"residuals must be 'auto', 'lanczos' or 'explicit', got {residuals!r}")
    return residuals


def top_eigenpairs(
    op: LinearOperator,
    k: int = 5,
    *,
    num_iters: int | None = None,
    seed: int = 0,
    eigenvectors: bool = False,
    residuals: str = "auto",
    progress: bool = False,
) -> EigenResult:
    """The ``k`` algebraically largest eigenvalues of ``op`` by Lanczos (largest first).

    Args:
        op: a symmetric operator.
        k: how many eigenvalues.
        num_iters: Lanczos steps; default ``max(4 k, 30)`` (capped at ``op.dim``). The returned
            residuals bound each eigenvalue's error, so check them when in doubt.
        seed: seed of the Gaussian start vector.
        eigenvectors: also return the Ritz vectors :math:`y_i = Q_m s_i`.
        residuals: ``"lanczos"``, ``"explicit"`` (``k`` extra products) or ``"auto"``: explicit
            unless the operator is float64 (see the module docstring).
        progress: show a progress bar.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    kind = _residual_kind(residuals, op.dtype)
    num_iters = max(4 * k, 30) if num_iters is None else num_iters
    need_basis = eigenvectors or kind == "explicit"
    run = lanczos(op, num_iters, seed=seed, keep_basis=need_basis, progress=progress)
    theta, s = tridiagonal_eigh(run.alpha, run.beta)
    order = torch.argsort(theta, descending=True)[:k]
    vectors = None
    if need_basis:
        assert run.basis is not None
        vectors = s[:, order].T.to(device=run.basis.device, dtype=run.basis.dtype) @ run.basis
    if kind == "explicit":
        assert vectors is not None
        res = []
        for th, y in zip(theta[order].tolist(), vectors, strict=True):
            y64 = y.to(torch.float64)
            r = op.matvec(y).to(torch.float64) - th * y64
            res.append(float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(y64)))
        resid = torch.tensor(res, dtype=torch.float64)
    else:
        # beta_m |s_mi| is the residual in exact arithmetic; float64 products carry rounding of
        # order eps * ||H||, below which no residual is meaningful.
        floor = torch.finfo(op.dtype).eps * float(theta.abs().max())
        resid = (run.beta_last * s[-1, order].abs()).clamp_min(floor)
    return EigenResult(theta[order], resid, vectors if eigenvectors else None, int(run.alpha.numel()), kind)
