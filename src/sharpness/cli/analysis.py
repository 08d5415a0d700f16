"""``sharpness hessian``, ``landscape`` and ``msharpness``: the paper's §4 measurements on trained runs.

Each command takes a run directory (written by ``sharpness train``) or a weights file inside one
(``model.pt`` or ``checkpoint.pt``; the run's ``config.yaml`` next to it gives the model and the
data). Every result JSON records where its numbers come from under ``source``: the run and
weights file, the split, batch size, numbers of batches and examples, whether and with which
seed the examples were shuffled, and the seed of the random probes or directions.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["register"]


@dataclass
class _Measured:
    loaded: Any
    """The harness's ``LoadedRun``."""
    batches: list
    source: dict
    ident: tuple[str, ...]
    """Path components naming the run (and the weights file when one was given), for labels."""


def _common(p: argparse.ArgumentParser, several: bool = False) -> None:
    what = "run directories (written by `sharpness train`) or model.pt / checkpoint.pt files inside them"
    if several:
        p.add_argument("runs", nargs="+", help=what)
    else:
        p.add_argument("run", help=what.replace("run directories", "a run directory").replace(" files", " file"))
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


def _require(ok: bool, message: str) -> None:
    """Invalid options end the command with one line (``sharpness CMD: error: ...``), no traceback."""
    if not ok:
        raise ValueError(message)


def _check_common(args: argparse.Namespace) -> None:
    _require(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    _require(args.batches >= 0, f"--batches must be >= 0 (0 = all), got {args.batches}")
    _require(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")


def _batches(loaded, args: argparse.Namespace, shuffle: bool) -> list:
    """The run's batches: the first examples in stored order, or, with ``shuffle``, examples drawn
    from the whole split in a random order fixed by ``--seed``."""
    count = None if args.batches == 0 else args.batches
    order = None
    if shuffle:
        import torch

        gen = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(loaded.split_size(args.split), generator=gen).numpy()
    return loaded.batches(args.split, args.batch_size, count, order=order)


def _load(target: str, args: argparse.Namespace, shuffle: bool = False) -> _Measured:
    from sharpness.harness.runs import load_run

    path = Path(target)
    file = path if path.is_file() else None
    run_dir = path.parent if file is not None else path
    loaded = load_run(run_dir, device=args.device, weights=file)
    if file is not None:
        ident = (*run_dir.resolve().parts[1:-1], f"{run_dir.resolve().name}-{file.stem}")
    else:
        ident = run_dir.resolve().parts[1:]
    batches = _batches(loaded, args, shuffle)
    source = {
        "run": str(run_dir),
        "weights": str(loaded.weights_file),
        "split": args.split,
        "batch_size": args.batch_size,
        "num_batches": len(batches),
        "num_examples": sum(int(b[1].shape[0]) for b in batches),
        "shuffled": shuffle,
        "shuffle_seed": args.seed if shuffle else None,
        "seed": args.seed,
        "device": str(loaded.device),
    }
    return _Measured(loaded, batches, source, ident)


def _labels(idents: list[tuple[str, ...]], given: list[str]) -> list[str]:
    """Short unique labels: the run's folder name, with as many parent folders (joined by ``_``)
    as it takes to tell the runs apart."""
    for i, a in enumerate(idents):
        for j in range(i):
            _require(a != idents[j], f"the same run is given twice: {given[j]} and {given[i]}")
    depth = 1
    while True:
        labels = ["_".join(ident[-depth:]) for ident in idents]
        if len(set(labels)) == len(labels):
            return labels
        _require(
            depth < max(len(ident) for ident in idents),
            "cannot give the runs distinct labels: " + ", ".join(given),
        )
        depth += 1


def _out(args: argparse.Namespace, run: str) -> Path:
    base = Path(run).parent if Path(run).is_file() else Path(run)
    out = Path(args.out) if args.out else base / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save(result: dict, out: Path, stem: str, npz: bool = False) -> None:
    from sharpness.analysis import save_result

    save_result(result, out / f"{stem}.json")
    if npz:
        save_result(result, out / f"{stem}.npz")


def _hessian(args: argparse.Namespace) -> int:
    _check_common(args)
    _require(args.top_k >= 1, f"--top-k must be >= 1, got {args.top_k}")
    _require(
        args.lanczos_iters is None or args.lanczos_iters >= args.top_k,
        f"--lanczos-iters must be >= --top-k ({args.top_k}), got {args.lanczos_iters}",
    )
    _require(args.slq_iters >= 1, f"--slq-iters must be >= 1, got {args.slq_iters}")
    _require(args.slq_starts >= 1, f"--slq-starts must be >= 1, got {args.slq_starts}")
    _require(args.trace_rtol >= 0, f"--trace-rtol must be >= 0, got {args.trace_rtol}")
    _require(args.trace_max_probes >= 2, f"--trace-max-probes must be >= 2, got {args.trace_max_probes}")
    import torch

    from sharpness.analysis import hessian_spectrum, plot_density
    from sharpness.harness.runs import cross_entropy_loss

    run = _load(args.run, args)
    result = hessian_spectrum(
        run.loaded.model,
        cross_entropy_loss,
        run.batches,
        top_k=args.top_k,
        lanczos_iters=args.lanczos_iters,
        density=not args.no_density,
        slq_starts=args.slq_starts,
        slq_iters=args.slq_iters,
        trace=not args.no_trace,
        trace_rtol=args.trace_rtol,
        trace_min_samples=min(10, args.trace_max_probes),
        trace_max_samples=args.trace_max_probes,
        power_check=args.power_check,
        bn_mode=args.bn_mode,
        dtype=torch.float64 if args.float64 else None,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    result["source"] = run.source
    out = _out(args, args.run)
    _save(result, out, "hessian")
    if "density" in result:
        plot_density(result, out / "hessian_density.png", title=f"Hessian spectral density: {run.loaded.run_dir}")
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
    _check_common(args)
    _require(args.points >= 2, f"--points must be >= 2, got {args.points}")
    _require(args.range > 0, f"--range must be > 0, got {args.range}")
    _require(args.points_per_batch >= 1, f"--points-per-batch must be >= 1, got {args.points_per_batch}")
    if args.interpolate:
        _require(len(args.runs) == 2, f"--interpolate needs exactly two runs, got {len(args.runs)}")
        _require(args.dim == 1, "--interpolate draws a 1-D curve; leave out --dim 2")
    from sharpness.analysis import (
        interpolation_1d,
        landscape_1d,
        landscape_2d,
        plot_landscape_1d,
        plot_landscape_2d,
    )
    from sharpness.harness.runs import cross_entropy_loss

    n = args.points
    span = [-args.range + 2 * args.range * i / (n - 1) for i in range(n)]
    loaded = [_load(run, args) for run in args.runs]
    labels = _labels([r.ident for r in loaded], args.runs)
    out = _out(args, args.runs[0])
    progress = sys.stderr.isatty()
    if args.interpolate:
        a, b = loaded
        alphas = [0.5 - args.range + 2 * args.range * i / (n - 1) for i in range(n)]
        result = interpolation_1d(
            a.loaded.model,
            cross_entropy_loss,
            a.batches,
            a.loaded.model.state_dict(),
            b.loaded.model.state_dict(),
            alphas=alphas,
            bn_mode=args.bn_mode,
            recalibration_batches=a.batches if args.recalibrate_bn else None,
            points_per_batch=args.points_per_batch,
            progress=progress,
        )
        result["source"] = {**a.source, "runs": [a.source["run"], b.source["run"]]}
        result["source"]["weights"] = [a.source["weights"], b.source["weights"]]
        result["labels"] = labels
        _save(result, out, "interpolation", npz=True)
        plot_landscape_1d(
            {f"{labels[0]} (0) to {labels[1]} (1)": result},
            out / "interpolation.png",
            title="linear interpolation between the two runs",
        )
        if result["clamped_variances"]:
            print(
                f"note: at {result['clamped_variances']} of {n} points an extrapolated BatchNorm variance "
                "was negative and set to 0 (--recalibrate-bn re-estimates the statistics instead)"
            )
        print(f"written to {out}")
        return 0
    curves = {}
    for run, label in zip(loaded, labels, strict=True):
        common = {
            "seed": args.seed,
            "bn_mode": args.bn_mode,
            "recalibration_batches": run.batches if args.recalibrate_bn else None,
            "points_per_batch": args.points_per_batch,
            "progress": progress,
        }
        if args.dim == 2:
            result = landscape_2d(run.loaded.model, cross_entropy_loss, run.batches, alphas=span, betas=span, **common)
            result["source"], result["label"] = run.source, label
            _save(result, out, f"landscape2d_{label}", npz=True)
            plot_landscape_2d(result, out / f"landscape2d_{label}.png", title=f"loss surface: {label}")
        else:
            result = landscape_1d(run.loaded.model, cross_entropy_loss, run.batches, alphas=span, **common)
            result["source"], result["label"] = run.source, label
            curves[label] = result
            _save(result, out, f"landscape1d_{label}", npz=True)
    if curves:
        plot_landscape_1d(curves, out / "landscape1d.png")
    print(f"written to {out}")
    return 0


def _parse_p(text: str) -> float:
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        p = float(text)
    except ValueError:
        p = math.nan
    _require(p > 1, f"--p must be a number > 1 or inf, got {text!r}")
    return p


def _msharpness(args: argparse.Namespace) -> int:
    _check_common(args)
    _require(all(m >= 1 for m in args.m), f"--m must be >= 1, got {args.m}")
    _require(len(set(args.m)) == len(args.m), f"--m values must be distinct, got {args.m}")
    _require(args.rho > 0, f"--rho must be > 0, got {args.rho}")
    p = _parse_p(args.p)
    _require(args.ascent_steps >= 1, f"--ascent-steps must be >= 1, got {args.ascent_steps}")
    _require(args.step_size is None or args.step_size > 0, f"--step-size must be > 0, got {args.step_size}")
    _require(
        args.step_size is None or args.ascent_steps > 1,
        "--step-size sets the length of the steps after the first; it needs --ascent-steps > 1",
    )
    _require(args.max_subsets is None or args.max_subsets >= 1, f"--max-subsets must be >= 1, got {args.max_subsets}")
    from sharpness.analysis import m_sharpness, plot_m_sharpness
    from sharpness.harness.runs import cross_entropy_loss

    run = _load(args.run, args, shuffle=args.shuffle)
    out = _out(args, args.run)
    results = []
    for m in args.m:
        result = m_sharpness(
            run.loaded.model,
            cross_entropy_loss,
            run.batches,
            m=m,
            rho=args.rho,
            p=p,
            ascent_steps=args.ascent_steps,
            step_size=args.step_size,
            bn_mode=args.bn_mode,
            max_subsets=args.max_subsets,
            progress=sys.stderr.isatty(),
        )
        result["source"] = run.source
        _save(result, out, f"msharpness_m{m}")
        results.append(result)
        print(
            f"m = {m}, rho = {args.rho}: sharpness = {result['sharpness']:.4g} ± "
            f"{1.96 * result['sharpness_stderr']:.2g} over {result['num_subsets']} subsets"
        )
    plot_m_sharpness(results, out / "msharpness.png", title=f"m-sharpness: {run.loaded.run_dir}")
    print(f"written to {out}")
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
    p.add_argument("--lanczos-iters", type=int, default=None, help="Lanczos steps for them (default: max(4 top-k, 30))")
    p.add_argument("--no-density", action="store_true", help="skip the spectral density")
    p.add_argument("--slq-iters", type=int, default=80, help="Lanczos steps per SLQ start (default: 80)")
    p.add_argument("--slq-starts", type=int, default=4, help="random SLQ starts (default: 4)")
    p.add_argument("--no-trace", action="store_true", help="skip the trace")
    p.add_argument(
        "--trace-rtol",
        type=float,
        default=0.05,
        help="stop the trace estimate when its 95%% interval's half-width is at most this fraction "
        "of the estimate (default: 0.05)",
    )
    p.add_argument(
        "--trace-max-probes", type=int, default=200, help="at most this many Hutchinson probes (default: 200)"
    )
    p.add_argument("--power-check", action="store_true", help="also run power iteration as a cross-check")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.set_defaults(handler=_hessian)

    p = sub.add_parser(
        "landscape",
        help="loss-landscape slices of trained runs (paper Figure 1)",
        description="1-D or 2-D slices of the loss along random filter-normalised directions "
        "(Li et al. 2018), or the linear interpolation between two runs. Writes JSON, NPZ (the "
        "same data, as arrays) and PNG. Runs are labelled by their folder name, with parent "
        "folders added when two runs share a name.",
    )
    _common(p, several=True)
    p.add_argument("--dim", type=int, choices=(1, 2), default=1, help="1-D or 2-D slices (default: 1)")
    p.add_argument("--points", type=int, default=21, help="grid points per axis, >= 2 (default: 21)")
    p.add_argument(
        "--range",
        type=float,
        default=1.0,
        help="slices span [-range, range]; with --interpolate, alpha spans [0.5 - range, 0.5 + range], "
        "the first run at 0 and the second at 1 (default: 1, i.e. [-0.5, 1.5])",
    )
    p.add_argument("--interpolate", action="store_true", help="interpolate between two runs instead")
    p.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="recompute BatchNorm statistics from the measured batches at every grid point (slices and interpolation)",
    )
    p.add_argument(
        "--points-per-batch",
        type=int,
        default=1,
        help="evaluate this many grid points in one vmapped forward pass (for GPUs: on a CPU it was 2-3x "
        "slower, docs/analysis.md; only with --bn-mode eval and without --recalibrate-bn, else one by one; "
        "default: 1)",
    )
    p.set_defaults(handler=_landscape)

    p = sub.add_parser(
        "msharpness",
        help="m-sharpness of a trained run (paper §4.1)",
        description="Mean over disjoint subsets of m examples of max_{||eps||<=rho} "
        "L_S(w+eps) - L_S(w), with the paper's first-order ascent (or several steps). The examples "
        "are drawn from the whole split in a random order fixed by --seed (--no-shuffle: the first "
        "ones in stored order, which for the digits set cycles through the classes, so every subset "
        "would look alike). Writes msharpness_m<m>.json per m and msharpness.png.",
    )
    _common(p)
    p.add_argument("--m", type=int, nargs="+", default=[32], help="subset size(s) m (default: 32)")
    p.add_argument("--rho", type=float, default=0.05, help="radius rho (default: 0.05)")
    p.add_argument("--p", default="2", help="norm p of the ball, a number > 1 or inf (default: 2)")
    p.add_argument(
        "--ascent-steps",
        type=int,
        default=1,
        help="ascent steps for the inner maximum (default: 1, the paper's first-order eps, eq. 2). "
        "Each further step re-applies eq. 2 at the current point (a conditional-gradient step) or, "
        "with --step-size, takes a normalised-gradient step of that length projected back onto the "
        "ball; the largest perturbed loss over the steps is kept",
    )
    p.add_argument("--step-size", type=float, default=None, help="length of the projected ascent steps")
    p.add_argument("--max-subsets", type=int, default=None, help="stop after this many subsets (default: all)")
    p.add_argument(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw the examples from the whole split in a random order fixed by --seed (default: on)",
    )
    p.set_defaults(handler=_msharpness)
