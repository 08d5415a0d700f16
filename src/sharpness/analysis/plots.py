"""PNG plots of analysis results, drawn with matplotlib's Agg canvas (no pyplot, no display).

* :func:`plot_density`: the SLQ spectral density on a log-density axis, like the paper's Figure 3.
* :func:`plot_landscape_1d`: several 1-D curves (interpolations or random slices) on one axis,
  e.g. SGD against SAM.
* :func:`plot_landscape_2d`: contour and surface of a 2-D slice, side by side.
* :func:`plot_m_sharpness`: m-sharpness against m with 95% error bars (several m, paper §4.1),
  or the histogram of the per-subset values (one m).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_density", "plot_landscape_1d", "plot_landscape_2d", "plot_m_sharpness"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def plot_density(result: Mapping, path: str | Path, *, floor: float | None = None, title: str | None = None) -> Path:
    """Plot a spectral density (a :func:`~sharpness.analysis.spectrum.hessian_spectrum` result, or
    its ``"density"`` entry) as density against eigenvalue on a logarithmic density axis.

    Values below ``floor`` (default :math:`10^{-8}` times the peak) are clipped to it, so the
    empty parts of the spectrum show as a flat floor instead of vanishing from a log axis.
    """
    dens = result["density"] if isinstance(result.get("density"), Mapping) else result
    grid = np.asarray(dens["grid"], dtype=float)
    values = np.asarray(dens["density"], dtype=float)
    floor = 1e-8 * float(values.max()) if floor is None else floor
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot()
    ax.semilogy(grid, np.maximum(values, floor), lw=1.2)
    ax.set_ylim(bottom=floor)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    if "lambda_max" in result:
        ax.axvline(result["lambda_max"], color="C3", ls="--", lw=0.8, label=r"$\lambda_{max}$")
        ax.legend(frameon=False)
    ax.set_title(title or f"Hessian spectral density (sigma = {dens['sigma']:.3g})")
    return _save(fig, path)


def plot_landscape_1d(
    results: Mapping[str, Mapping],
    path: str | Path,
    *,
    metric: str = "loss",
    log: bool = False,
    title: str | None = None,
) -> Path:
    """Plot ``metric`` against ``alphas`` for each labelled 1-D result on one axis."""
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot()
    kinds = set()
    for label, res in results.items():
        values = res["loss"] if metric == "loss" else res["metrics"][metric]
        ax.plot(res["alphas"], values, label=label, lw=1.5)
        kinds.add(res.get("kind"))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(r"$\alpha$ (interpolation)" if kinds == {"interpolation"} else r"$\alpha$ (direction scale)")
    ax.set_ylabel(metric)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_landscape_2d(
    result: Mapping,
    path: str | Path,
    *,
    metric: str = "loss",
    levels: int = 30,
    log: bool = False,
    title: str | None = None,
) -> Path:
    """Contour (left) and surface (right) of a 2-D slice; ``log`` plots :math:`\\log_{10}` values."""
    from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the 3-D projection)

    z = np.asarray(result["loss"] if metric == "loss" else result["metrics"][metric], dtype=float)
    if log:
        z = np.log10(np.maximum(z, np.finfo(float).tiny))
    a, b = np.meshgrid(np.asarray(result["alphas"]), np.asarray(result["betas"]), indexing="ij")
    label = f"log10 {metric}" if log else metric
    fig = _figure(10.0, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    cs = ax.contour(a, b, z, levels=levels, cmap="viridis")
    ax.clabel(cs, fontsize=6, inline=True)
    ax.plot([0], [0], "k+", ms=8)
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(r"$\beta$")
    ax.set_title(f"{label}: contour")
    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    ax3.plot_surface(a, b, z, cmap="viridis", linewidth=0, antialiased=True)
    ax3.set_xlabel(r"$\alpha$")
    ax3.set_ylabel(r"$\beta$")
    ax3.set_zlabel(label)
    ax3.set_title(f"{label}: surface")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_m_sharpness(results: Sequence[Mapping], path: str | Path, *, title: str | None = None) -> Path:
    r"""Plot :func:`~sharpness.analysis.m_sharpness.m_sharpness` results.

    Several results (different ``m``): sharpness against ``m`` on a logarithmic axis, with error
    bars of :math:`\pm 1.96` standard errors over subsets. One result: the histogram of its
    per-subset values, with their mean marked.
    """
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot()
    if len(results) == 1:
        res = results[0]
        values = np.asarray(res["per_subset"], dtype=float)
        ax.hist(values, bins=max(5, min(50, int(np.sqrt(values.size)) + 1)), color="C0", alpha=0.8)
        ax.axvline(res["sharpness"], color="C3", ls="--", lw=1.0, label=f"mean {res['sharpness']:.3g}")
        ax.set_xlabel(f"max L_S(w+eps) - L_S(w) per subset (m = {res['m']}, rho = {res['rho']:g})")
        ax.set_ylabel("subsets")
        ax.legend(frameon=False)
    else:
        ordered = sorted(results, key=lambda r: r["m"])
        ms = [r["m"] for r in ordered]
        ax.errorbar(
            ms,
            [r["sharpness"] for r in ordered],
            yerr=[1.96 * r["sharpness_stderr"] for r in ordered],
            marker="o",
            capsize=3,
            lw=1.2,
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_xlabel("m (examples per subset)")
        ax.set_ylabel(f"m-sharpness (rho = {ordered[0]['rho']:g})")
    ax.set_title(title or "m-sharpness")
    return _save(fig, path)
