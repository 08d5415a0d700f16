"""Sharpness analysis of any ``torch.nn.Module`` (Foret et al. 2021, §4; Figures 1 and 3).

A loss is ``loss_fn(model, batch) -> Tensor`` (the batch mean) and data is a re-iterable of
batches, so nothing here depends on the training harness. Every analysis leaves the model's
parameters, buffers and training flags bit-identical.

* Hessian: :class:`HessianOperator` (exact products over a data set), :func:`top_eigenpairs`
  (Lanczos), :func:`power_iteration`, :func:`spectral_density` (SLQ), :func:`hutchinson_trace`,
  and :func:`hessian_spectrum`, which runs them all.
* :func:`m_sharpness` (§4.1).
* Loss landscapes: :func:`interpolation_1d`, :func:`landscape_1d`, :func:`landscape_2d`, with
  filter-normalised :func:`random_direction` and :func:`recalibrate_bn`.
* Output: :func:`save_result` / :func:`load_result` (JSON, NPZ), :func:`plot_density`,
  :func:`plot_landscape_1d`, :func:`plot_landscape_2d`, :func:`plot_m_sharpness`.
* Random probes: :func:`random_vector`, :func:`derive_seed` (:mod:`sharpness.analysis.probes`).
"""

from sharpness.analysis.density import SpectralDensity, gaussian_density, slq_quadrature, spectral_density
from sharpness.analysis.directions import filter_normalize, parameter_values, random_direction
from sharpness.analysis.hessian import HessianOperator, LossFn
from sharpness.analysis.lanczos import EigenResult, LanczosResult, lanczos, top_eigenpairs, tridiagonal_eigh
from sharpness.analysis.landscape import (
    evaluate,
    interpolation_1d,
    landscape_1d,
    landscape_2d,
    recalibrate_bn,
)
from sharpness.analysis.m_sharpness import m_sharpness
from sharpness.analysis.model_state import preserved_state
from sharpness.analysis.operators import LinearOperator, MatrixOperator
from sharpness.analysis.plots import plot_density, plot_landscape_1d, plot_landscape_2d, plot_m_sharpness
from sharpness.analysis.power_iteration import PowerResult, power_iteration
from sharpness.analysis.probes import derive_seed, random_vector
from sharpness.analysis.results import load_result, save_result
from sharpness.analysis.spectrum import hessian_spectrum
from sharpness.analysis.trace import TraceEstimate, hutchinson_trace

__all__ = [
    "EigenResult",
    "HessianOperator",
    "LanczosResult",
    "LinearOperator",
    "LossFn",
    "MatrixOperator",
    "PowerResult",
    "SpectralDensity",
    "TraceEstimate",
    "derive_seed",
    "evaluate",
    "filter_normalize",
    "gaussian_density",
    "hessian_spectrum",
    "hutchinson_trace",
    "interpolation_1d",
    "lanczos",
    "landscape_1d",
    "landscape_2d",
    "load_result",
    "m_sharpness",
    "parameter_values",
    "plot_density",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_m_sharpness",
    "power_iteration",
    "preserved_state",
    "random_vector",
    "random_direction",
    "recalibrate_bn",
    "save_result",
    "slq_quadrature",
    "spectral_density",
    "top_eigenpairs",
    "tridiagonal_eigh",
]
