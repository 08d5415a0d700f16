r"""Power iteration, the cross-check for the Lanczos top eigenvalue.

:math:`v_{t+1} = Hv_t / \|Hv_t\|` converges to the eigenvector of the eigenvalue of largest
*magnitude*, at the rate :math:`|\lambda_2/\lambda_1|^t`; the Rayleigh quotient
:math:`\theta_t = v_t^\top H v_t` is the estimate. For a Hessian whose most negative eigenvalue is
larger in magnitude than :math:`\lambda_{\max}`, it finds that one instead (compare with Lanczos,
which returns both ends). Iteration stops when the relative residual
:math:`\|Hv_t - \theta_t v_t\| / |\theta_t|` falls below ``tol``; by the same bound as for
Lanczos, :math:`\theta_t` is then within ``tol`` :math:`\cdot|\theta_t|` of an eigenvalue.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sharpness.analysis.operators import LinearOperator
from sharpness.analysis.probes import probe_generator, random_vector
from sharpness.analysis.progress import progress_bar

__all__ = ["PowerResult", "power_iteration"]


class PowerResult(NamedTuple):
    """Outcome of :func:`power_iteration`."""

    eigenvalue: float
    eigenvector: Tensor
    residual: float
    """:math:`\\|Hv - \\theta v\\|` at the returned vector."""
    num_iters: int
    converged: bool


def power_iteration(
    op: LinearOperator,
    *,
    max_iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> PowerResult:
    """Dominant eigenpair of ``op`` by power iteration from a seeded Gaussian start (drawn on the
    operator's device, :mod:`sharpness.analysis.probes`).

    One operator product per iteration; ``tol <= 0`` runs exactly ``max_iters`` iterations.
    """
    v = random_vector(op.dim, probe_generator(seed, op.device), dtype=op.dtype)
    v = v / torch.linalg.vector_norm(v)
    theta, residual, it = 0.0, float("inf"), 0
    for it in progress_bar(range(1, max_iters + 1), desc="power iteration", enabled=progress):
        w = op.matvec(v)
        theta = float(torch.dot(v, w))
        residual = float(torch.linalg.vector_norm(w - theta * v))
        if residual <= tol * abs(theta):
            return PowerResult(theta, v, residual, it, True)
        norm = torch.linalg.vector_norm(w)
        if float(norm) == 0.0:
            return PowerResult(0.0, v, 0.0, it, True)
        if it == max_iters:
            break
        v = w / norm
    return PowerResult(theta, v, residual, it, False)
