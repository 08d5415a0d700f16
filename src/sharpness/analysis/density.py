r"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric :math:`H \in \mathbb{R}^{n\times n}` with eigenvalues
:math:`\lambda_i` is :math:`\phi(t) = \frac1n \sum_i \delta(t - \lambda_i)`, and for any smooth
:math:`f`, :math:`\int f\,\phi = \frac1n \operatorname{tr} f(H) = \mathbb{E}_v[\hat v^\top f(H)\hat v]`
for random :math:`v` with :math:`\mathbb{E}[vv^\top] = I` scaled to :math:`\hat v = v/\|v\|`
(exactly so for Rademacher :math:`v`, whose norm is always :math:`\sqrt n`; for Gaussian
:math:`v`, :math:`\hat v` is uniform on the sphere, which gives the same expectation).

Each quadratic form is computed by Gauss quadrature (Golub & Meurant 2010): :math:`m` Lanczos
steps from :math:`\hat v` give :math:`T_m = S\Theta S^\top`, and

.. math::
    \hat v^\top f(H) \hat v \approx \sum_{i=1}^m \tau_i f(\theta_i), \qquad \tau_i = S_{1i}^2,

exact for polynomials of degree up to :math:`2m - 1`. Averaging over :math:`R` starts and
replacing each node by a Gaussian of width :math:`\sigma` gives the smoothed density of Ghorbani,
Krishnan & Xiao (ICML 2019), eq. (5):

.. math::
    \phi_\sigma(t) = \frac1R \sum_{r=1}^R \sum_{i=1}^m \tau_i^{(r)} g_\sigma(t - \theta_i^{(r)}),
    \qquad g_\sigma(x) = \frac{e^{-x^2 / 2\sigma^2}}{\sigma\sqrt{2\pi}} .

It integrates to 1, and its first two moments are :math:`\frac1R\sum_r \hat v_r^\top H \hat v_r`
(an unbiased estimate of :math:`\operatorname{tr}(H)/n`) and
:math:`\frac1R\sum_r \hat v_r^\top H^2 \hat v_r + \sigma^2`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from sharpness.analysis.lanczos import lanczos, tridiagonal_eigh
from sharpness.analysis.operators import LinearOperator
from sharpness.analysis.probes import probe_generator, random_vector
from sharpness.analysis.progress import progress_bar

__all__ = ["SpectralDensity", "slq_quadrature", "gaussian_density", "spectral_density"]

# Largest automatic grid; beyond it the grid spacing grows past sigma / 4.
_MAX_AUTO_POINTS = 20001


class SpectralDensity(NamedTuple):
    """A smoothed spectral density on a grid, with the quadrature it came from."""

    grid: Tensor
    """Evaluation points :math:`t`, float64."""
    density: Tensor
    """:math:`\\phi_\\sigma(t)`, float64."""
    sigma: float
    nodes: list[Tensor]
    """Ritz values :math:`\\theta^{(r)}`, one float64 tensor per start."""
    weights: list[Tensor]
    """Quadrature weights :math:`\\tau^{(r)}` (each sums to 1), one float64 tensor per start."""


def slq_quadrature(
    op: LinearOperator,
    *,
    num_starts: int = 4,
    num_iters: int = 80,
    distribution: str = "rademacher",
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """Gauss quadrature nodes and weights for ``num_starts`` random starts of ``num_iters`` Lanczos
    steps each (``num_starts * num_iters`` operator products).

    Start :math:`r` is the :math:`r`-th vector drawn by
    :func:`~sharpness.analysis.probes.random_vector` from
    ``probe_generator(seed, op.device)``, on the operator's device and in its dtype.
    """
    if num_starts < 1:
        raise ValueError("num_starts must be >= 1")
    gen = probe_generator(seed, op.device)
    nodes, weights = [], []
    for _ in progress_bar(range(num_starts), desc="SLQ starts", enabled=progress):
        v = random_vector(op.dim, gen, distribution=distribution, dtype=op.dtype)
        run = lanczos(op, num_iters, start=v)
        theta, s = tridiagonal_eigh(run.alpha, run.beta)
        nodes.append(theta)
        weights.append(s[0] ** 2)
    return nodes, weights


def gaussian_density(
    nodes: list[Tensor],
    weights: list[Tensor],
    *,
    sigma: float | None = None,
    sigma_rel: float = 0.01,
    grid: Tensor | None = None,
    num_points: int | None = None,
    pad: float = 6.0,
) -> tuple[Tensor, Tensor, float]:
    """Smooth quadrature rules into :math:`\\phi_\\sigma` on a grid; returns ``(grid, density, sigma)``.

    Args:
        nodes, weights: one quadrature rule per start, as from :func:`slq_quadrature`.
        sigma: Gaussian width; default ``sigma_rel`` times the spread of all nodes.
        sigma_rel: relative width used when ``sigma`` is not given.
        grid: evaluation points; default a uniform grid from the smallest node minus
            ``pad * sigma`` to the largest plus ``pad * sigma`` (the mass outside is below
            :math:`10^{-9}` for ``pad = 6``).
        num_points: size of the default grid; default: spacing :math:`\\sigma/4` (at most 20001
            points), at which the trapezoidal rule integrates the Gaussians to rounding.
    """
    theta = torch.cat([n.to(torch.float64).cpu() for n in nodes])
    tau = torch.cat([w.to(torch.float64).cpu() for w in weights]) / len(nodes)
    lo, hi = float(theta.min()), float(theta.max())
    if sigma is None:
        spread = hi - lo
        sigma = sigma_rel * (spread if spread > 0 else max(abs(hi), 1.0))
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if grid is None:
        lo, hi = lo - pad * sigma, hi + pad * sigma
        if num_points is None:
            num_points = min(_MAX_AUTO_POINTS, math.ceil((hi - lo) / (sigma / 4)) + 1)
        grid = torch.linspace(lo, hi, num_points, dtype=torch.float64)
    grid = grid.to(torch.float64).cpu()
    density = torch.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for start in range(0, theta.numel(), 512):
        th, w = theta[start : start + 512], tau[start : start + 512]
        z = (grid[:, None] - th[None, :]) / sigma
        density += (torch.exp(-0.5 * z * z) * w[None, :]).sum(dim=1) * norm
    return grid, density, float(sigma)


def spectral_density(
    op: LinearOperator,
    *,
    num_starts: int = 4,
    num_iters: int = 80,
    distribution: str = "rademacher",
    sigma: float | None = None,
    sigma_rel: float = 0.01,
    num_points: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> SpectralDensity:
    """SLQ spectral density of ``op``: :func:`slq_quadrature` then :func:`gaussian_density`."""
    nodes, weights = slq_quadrature(
        op,
        num_starts=num_starts,
        num_iters=num_iters,
        distribution=distribution,
        seed=seed,
        progress=progress,
    )
    grid, density, sigma = gaussian_density(nodes, weights, sigma=sigma, sigma_rel=sigma_rel, num_points=num_points)
    return SpectralDensity(grid, density, sigma, nodes, weights)
