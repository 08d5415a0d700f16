"""``sharpness hessian``, ``landscape`` and ``msharpness``: the paper's §4 measurements on trained runs."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["register"]


def _common(p: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        p.add_argument("runs", nargs="+", help="run directories (written by `sharpness train`)")
    else:
        p.add_argument("run", help="a run directory (written by `sharpness train`)")
    p.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="data to measure on: the run's training set with its (possibly noisy) labels, or the "
        "test set (default: train)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="examples per batch (default: 256)")
    p.add_argument("--batches", type=int, default=4, help="number of batches used (default: 4; 0 = all)")
    p.add_argument(
        "--bn-mode",
        choices=("eval", "train"),
        default="eval",
        help="BatchNorm with running statistics (eval) or batch statistics, running statistics "
        "restored afterwards (train); default: eval",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    p.add_argument("--out", help="output folder (default: <run>/analysis)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the probes and directions (default: 0)")


def _load(run: str, args: argparse.Namespace):
    from sharpness.harness.runs import load_run

    loaded = load_run(run, device=args.device)
    batches = loaded.batches(args.split, args.batch_size, args.batches or None)
    return loaded, batches


def _out(args: argparse.Namespace, run: str) -> Path:
    out = Path(args.out) if args.out else Path(run) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _hessian(args: argparse.Namespace) -> int:
    import torch

    from sharpness.analysis import hessian_spectrum, plot_density, save_result
    from sharpness.harness.runs import cross_entropy_loss

    loaded, batches = _load(args.run, args)
    result = hessian_spectrum(
        loaded.model,
        cross_entropy_loss,
        batches,
        top_k=args.top_k,
        density=not args.no_density,
        trace=not args.no_trace,
        power_check=args.power_check,
        bn_mode=args.bn_mode,
        dtype=torch.float64 if args.float64 else None,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    out = _out(args, args.run)
    save_result(result, out / "hessian.json")
    if "density" in result:
        plot_density(result, out / "hessian_density.png", title=f"Hessian spectral density: {loaded.run_dir}")
    ratio = result.get("lambda_max_over_lambda_5")
    print(f"lambda_max = {result['lambda_max']:.4g}" + (f", lambda_max/lambda_5 = {ratio:.3g}" if ratio else ""))
    if "trace" in result:
        tr = result["trace"]
        interval = (
            f" ({tr['confidence']:.0%} CI {tr['ci_low']:.4g} to {tr['ci_high']:.4g})"
            if tr["ci_low"] is not None
            else ""
        )
        print(f"trace = {tr['estimate']:.4g}{interval}, {tr['num_samples']} probes")
    print(f"written to {out}")
    return 0


def _landscape(args: argparse.Namespace) -> int:
    from sharpness.analysis import (
        interpolation_1d,
        landscape_1d,
        landscape_2d,
        plot_landscape_1d,
        plot_landscape_2d,
        save_result,
    )
    from sharpness.harness.runs import cross_entropy_loss

    span = [-args.range + 2 * args.range * i / (args.points - 1) for i in range(args.points)]
    out = Path(args.out) if args.out else Path(args.runs[0]) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    loaded = [_load(run, args) for run in args.runs]
    progress = sys.stderr.isatty()
    if args.interpolate:
        if len(loaded) != 2:
            raise ValueError("--interpolate needs exactly two runs")
        (a, batches), (b, _) = loaded
        alphas = [-0.5 + 2.0 * i / (args.points - 1) for i in range(args.points)]
        result = interpolation_1d(
            a.model,
            cross_entropy_loss,
            batches,
            a.model.state_dict(),
            b.model.state_dict(),
            alphas=alphas,
            bn_mode=args.bn_mode,
            progress=progress,
        )
        save_result(result, out / "interpolation.json")
        plot_landscape_1d({"interpolation": result}, out / "interpolation.png")
        print(f"written to {out}")
        return 0
    curves = {}
    for run, (lr, batches) in zip(args.runs, loaded, strict=True):
        label = Path(run).name
        recal = batches if args.recalibrate_bn else None
        if args.dim == 2:
            result = landscape_2d(
                lr.model,
                cross_entropy_loss,
                batches,
                alphas=span,
                betas=span,
                seed=args.seed,
                bn_mode=args.bn_mode,
                recalibration_batches=recal,
                progress=progress,
            )
            save_result(result, out / f"landscape2d_{label}.json")
            plot_landscape_2d(result, out / f"landscape2d_{label}.png", title=f"loss surface: {label}")
        else:
            curves[label] = landscape_1d(
                lr.model,
                cross_entropy_loss,
                batches,
                alphas=span,
                seed=args.seed,
                bn_mode=args.bn_mode,
                recalibration_batches=recal,
                progress=progress,
            )
            save_result(curves[label], out / f"landscape1d_{label}.json")
    if curves:
        plot_landscape_1d(curves, out / "landscape1d.png")
    print(f"written to {out}")
    return 0


def _msharpness(args: argparse.Namespace) -> int:
    from sharpness.analysis import m_sharpness
    from sharpness.harness.runs import cross_entropy_loss

    loaded, batches = _load(args.run, args)
    result = m_sharpness(
        loaded.model,
        cross_entropy_loss,
        batches,
        m=args.m,
        rho=args.rho,
        p=math.inf if args.p == "inf" else float(args.p),
        ascent_steps=args.ascent_steps,
        bn_mode=args.bn_mode,
        progress=sys.stderr.isatty(),
    )
    out = _out(args, args.run)
    (out / f"msharpness_m{args.m}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"m = {args.m}, rho = {args.rho}: sharpness = {result['sharpness']:.4g} ± "
        f"{1.96 * result['sharpness_stderr']:.2g} over {result['num_subsets']} subsets"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hessian",
        help="Hessian spectrum of a trained run (Lanczos, SLQ density, trace)",
        description="Top eigenvalues by Lanczos with full reorthogonalisation, the spectral "
        "density by stochastic Lanczos quadrature (paper Figure 3) and the trace by Hutchinson's "
        "estimator with a confidence interval. Writes hessian.json and hessian_density.png.",
    )
    _common(p)
    p.add_argument("--top-k", type=int, default=5, help="number of top eigenvalues (default: 5)")
    p.add_argument("--no-density", action="store_true", help="skip the spectral density")
    p.add_argument("--no-trace", action="store_true", help="skip the trace")
    p.add_argument("--power-check", action="store_true", help="also run power iteration as a cross-check")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.set_defaults(handler=_hessian)

    p = sub.add_parser(
        "landscape",
        help="loss-landscape slices of trained runs (paper Figure 1)",
        description="1-D or 2-D slices of the loss along random filter-normalised directions "
        "(Li et al. 2018), or the linear interpolation between two runs. Writes JSON and PNG.",
    )
    _common(p, several=True)
    p.add_argument("--dim", type=int, choices=(1, 2), default=1, help="1-D or 2-D slices (default: 1)")
    p.add_argument("--points", type=int, default=21, help="grid points per axis (default: 21)")
    p.add_argument("--range", type=float, default=1.0, help="the grid spans [-range, range] (default: 1)")
    p.add_argument("--interpolate", action="store_true", help="interpolate between two runs instead")
    p.add_argument("--recalibrate-bn", action="store_true", help="recompute BatchNorm statistics at every grid point")
    p.set_defaults(handler=_landscape)

    p = sub.add_parser(
        "msharpness",
        help="m-sharpness of a trained run (paper §4.1)",
        description="Mean over disjoint subsets of m examples of max_{||eps||<=rho} "
        "L_S(w+eps) - L_S(w), with the paper's first-order ascent (or several steps).",
    )
    _common(p)
    p.add_argument("--m", type=int, default=32, help="subset size m (default: 32)")
    p.add_argument("--rho", type=float, default=0.05, help="radius rho (default: 0.05)")
    p.add_argument("--p", default="2", help="norm p of the ball, a number > 1 or inf (default: 2)")
    p.add_argument("--ascent-steps", type=int, default=1, help="projected ascent steps (default: 1)")
    p.set_defaults(handler=_msharpness)
