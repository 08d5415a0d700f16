r"""One call for the Hessian spectrum of a training loss: top eigenvalues, trace, density.

This is the entry point the CLI uses; it returns a plain dict that serialises to JSON. The
quantities are those of the paper's §4 and Figure 3 (after Ghorbani et al. 2019 and
Jastrzebski et al. 2020): :math:`\lambda_{\max}`, the ratio :math:`\lambda_{\max}/\lambda_5`,
:math:`\operatorname{tr} H`, and the spectral density.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from sharpness.analysis.batches import Batch
from sharpness.analysis.density import spectral_density
from sharpness.analysis.hessian import HessianOperator, LossFn
from sharpness.analysis.lanczos import top_eigenpairs
from sharpness.analysis.model_state import BNMode, preserved_state
from sharpness.analysis.power_iteration import power_iteration
from sharpness.analysis.probes import derive_seed
from sharpness.analysis.trace import hutchinson_trace

__all__ = ["hessian_spectrum"]


def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    params: Sequence[str | nn.Parameter] | None = None,
    top_k: int = 5,
    lanczos_iters: int | None = None,
    power_check: bool = False,
    power_iters: int = 100,
    trace: bool = True,
    trace_rtol: float = 0.05,
    trace_confidence: float = 0.95,
    trace_min_samples: int = 10,
    trace_max_samples: int = 200,
    density: bool = True,
    slq_starts: int = 4,
    slq_iters: int = 80,
    sigma: float | None = None,
    sigma_rel: float = 0.01,
    dtype: torch.dtype | None = None,
    bn_mode: BNMode = "eval",
    weights: Sequence[float] | None = None,
    cache_graphs: bool | None = None,
    ritz_residuals: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Spectrum of the Hessian of the training loss over ``batches``.

    Args:
        model, loss_fn, batches, params, dtype, bn_mode, weights, cache_graphs: as in
            :class:`~sharpness.analysis.hessian.HessianOperator`.
        top_k: how many top eigenvalues (Lanczos, :func:`~sharpness.analysis.lanczos.top_eigenpairs`).
        lanczos_iters: Lanczos steps for them (default ``max(4 top_k, 30)``).
        power_check: also run power iteration (:math:`|\\lambda|_{\\max}`, a cross-check).
        power_iters: its maximum number of iterations.
        trace, trace_rtol, trace_confidence, trace_min_samples, trace_max_samples: Hutchinson's
            estimate and its stopping rule (:func:`~sharpness.analysis.trace.hutchinson_trace`).
        density, slq_starts, slq_iters, sigma, sigma_rel: the SLQ density
            (:func:`~sharpness.analysis.density.spectral_density`).
        ritz_residuals: how the Lanczos residuals are computed, ``"auto"`` (explicitly, with
            ``top_k`` extra products, unless the products are float64), ``"lanczos"`` or
            ``"explicit"`` (:func:`~sharpness.analysis.lanczos.top_eigenpairs`).
        seed: seeds every random vector; each method draws from its own stream
            (:func:`~sharpness.analysis.probes.derive_seed` of ``seed`` and the method's name,
            recorded under ``seeds``), so no two methods share a probe.
        progress: show progress bars (only on a terminal).

    Returns:
        ``num_params``, ``top_eigenvalues`` (descending) with their ``ritz_residuals`` (error
        bounds) and ``ritz_residuals_kind``, ``lambda_max``, ``lambda_max_over_lambda_5`` (``None`` when ``top_k < 5``
        or :math:`\\lambda_5 = 0`), optionally ``power_iteration``, ``trace`` (estimate,
        interval, samples used) and ``density`` (grid, values, sigma, quadrature nodes and
        weights), ``seed`` and the derived ``seeds``, ``num_hvps`` and ``seconds`` per part.
    """
    with preserved_state(model):
        op = HessianOperator(
            model,
            loss_fn,
            batches,
            params=params,
            dtype=dtype,
            bn_mode=bn_mode,
            weights=weights,
            cache_graphs=cache_graphs,
        )
        seconds: dict[str, float] = {}
        seeds = {name: derive_seed(seed, name) for name in ("lanczos", "power_iteration", "trace", "density")}
        out: dict = {
            "num_params": op.dim,
            "dtype": str(op.dtype).removeprefix("torch."),
            "bn_mode": bn_mode,
            "seed": seed,
            "seeds": seeds,
        }

        t0 = time.perf_counter()
        eig = top_eigenpairs(
            op, top_k, num_iters=lanczos_iters, seed=seeds["lanczos"], residuals=ritz_residuals, progress=progress
        )
        seconds["lanczos"] = time.perf_counter() - t0
        top = eig.eigenvalues.tolist()
        out["top_eigenvalues"] = top
        out["ritz_residuals"] = eig.residuals.tolist()
        out["ritz_residuals_kind"] = eig.residual_kind
        out["lanczos_iters"] = eig.num_iters
        out["lambda_max"] = top[0]
        out["lambda_max_over_lambda_5"] = top[0] / top[4] if len(top) >= 5 and top[4] != 0 else None

        if power_check:
            t0 = time.perf_counter()
            pw = power_iteration(op, max_iters=power_iters, seed=seeds["power_iteration"], progress=progress)
            seconds["power_iteration"] = time.perf_counter() - t0
            out["power_iteration"] = {
                "eigenvalue": pw.eigenvalue,
                "residual": pw.residual,
                "num_iters": pw.num_iters,
                "converged": pw.converged,
            }

        if trace:
            t0 = time.perf_counter()
            tr = hutchinson_trace(
                op,
                rtol=trace_rtol,
                confidence=trace_confidence,
                min_samples=trace_min_samples,
                max_samples=trace_max_samples,
                seed=seeds["trace"],
                progress=progress,
            )
            seconds["trace"] = time.perf_counter() - t0
            out["trace"] = {
                "estimate": tr.estimate,
                "ci_low": tr.ci_low if math.isfinite(tr.ci_low) else None,
                "ci_high": tr.ci_high if math.isfinite(tr.ci_high) else None,
                "stderr": tr.stderr if math.isfinite(tr.stderr) else None,
                "confidence": tr.confidence,
                "num_samples": tr.num_samples,
                "converged": tr.converged,
            }

        if density:
            t0 = time.perf_counter()
            sd = spectral_density(
                op,
                num_starts=slq_starts,
                num_iters=slq_iters,
                sigma=sigma,
                sigma_rel=sigma_rel,
                seed=seeds["density"],
                progress=progress,
            )
            seconds["density"] = time.perf_counter() - t0
            out["density"] = {
                "grid": sd.grid.tolist(),
                "density": sd.density.tolist(),
                "sigma": sd.sigma,
                "nodes": [n.tolist() for n in sd.nodes],
                "weights": [w.tolist() for w in sd.weights],
                "num_starts": slq_starts,
                "num_iters": slq_iters,
            }
        out["num_hvps"] = op.num_matvecs
        out["seconds"] = seconds
    return out
