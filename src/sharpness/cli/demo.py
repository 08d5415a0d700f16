"""``sharpness demo``: the paper's story in about two minutes on a CPU, on the embedded digits data set.

SGD and SAM are trained over several seeds with clean and noisy labels (paper Tables 1 and 4 in miniature);
the test errors are reported as mean ± 95% CI; then the Hessian's top eigenvalue of both solutions and their
loss-landscape slices (paper Figures 1 and 3) show SAM's minimum is the flatter one.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["register", "run_demo"]

CONDITIONS = {"clean": 0.0, "noise-40": 0.4}

# The demo's figures are sums of many small reductions, and how PyTorch splits a reduction between its
# intra-op threads changes the rounding: one thread gives the same digits however many cores, whatever else
# runs, and whatever OMP_NUM_THREADS says (the demo's models are too small to gain from more).
DEMO_THREADS = 1


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, restoring the previous count after it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(out: Path, seeds: list[int], config: str = "demo-digits", progress: bool = False) -> dict:
    """Train the demo's runs in ``out`` (reusing finished ones), then report and measure them, on
    :data:`DEMO_THREADS` threads."""
    with fixed_threads(DEMO_THREADS):
        return _run_demo(out, seeds, config, progress)


def _run_demo(out: Path, seeds: list[int], config: str, progress: bool) -> dict:
    from sharpness.analysis import hessian_spectrum, landscape_1d, landscape_2d, plot_landscape_1d, plot_landscape_2d
    from sharpness.cli.training import label_epochs
    from sharpness.harness.config import load_config
    from sharpness.harness.report import aggregate, collect_summaries, markdown_table, plot_comparison
    from sharpness.harness.runs import cross_entropy_loss, load_run
    from sharpness.harness.train import train

    started = time.perf_counter()
    for condition, noise in CONDITIONS.items():
        for seed in seeds:
            for method in ("sgd", "sam"):
                run_dir = out / condition / f"{method}-seed{seed}"
                if (run_dir / "summary.json").exists():
                    continue
                cfg = load_config(
                    config, [f"name=digits-{condition}", f"label_noise={noise}", f"method={method}", f"seed={seed}"]
                )
                train(cfg, run_dir, resume=(run_dir / "config.yaml").exists(), progress=progress)
                print(
                    f"  trained {condition} {method} seed {seed} ({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                )
    rows = aggregate(label_epochs(collect_summaries([out])), metric="test_error")
    table = markdown_table(rows, metric="test_error")
    (out / "report.md").write_text(table + "\n")
    plot_comparison(rows, out / "report.png", metric="test_error")

    sharpness_lines, curves = [], {}
    span = [-1.0 + 0.1 * i for i in range(21)]
    for method in ("sgd", "sam"):
        run = load_run(out / "clean" / f"{method}-seed{seeds[0]}", device="cpu")
        batches = run.batches("train", batch_size=512)
        spectrum = hessian_spectrum(
            run.model, cross_entropy_loss, batches, top_k=5, density=False, trace=False, progress=False
        )
        sharpness_lines.append((method, spectrum["lambda_max"], spectrum["lambda_max_over_lambda_5"]))
        curves[method.upper()] = landscape_1d(
            run.model, cross_entropy_loss, batches, alphas=span, seed=0, progress=False
        )
        surface = landscape_2d(
            run.model, cross_entropy_loss, batches, alphas=span[::2], betas=span[::2], seed=0, progress=False
        )
        plot_landscape_2d(
            surface,
            out / f"landscape2d_{method}.png",
            title=f"training loss around the {method.upper()} solution (filter-normalised directions)",
        )
    plot_landscape_1d(curves, out / "landscape1d.png", title="training loss along a random filter-normalised direction")
    return {"table": table, "sharpness": sharpness_lines, "seconds": time.perf_counter() - started}


def _demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    seeds = list(range(args.seeds))
    print(
        f"sharpness demo: SGD vs SAM on the embedded digits set, {len(seeds)} seeds, clean and 40% noisy "
        f"labels; runs in {out}",
        file=sys.stderr,
    )
    result = run_demo(out, seeds, config=args.config, progress=False)
    print("\nTest error (%) at the end of training, mean ± 95% CI over seeds:\n")
    print(result["table"])
    print("\nSharpness of the clean-label solutions (seed 0), training loss Hessian:\n")
    print("| method | lambda_max | lambda_max / lambda_5 |\n|---|---|---|")
    for method, lam, ratio in result["sharpness"]:
        print(f"| {method.upper()} | {lam:.3f} | {ratio:.2f} |")
    print(
        f"\nPictures: {out / 'landscape1d.png'}, {out / 'landscape2d_sgd.png'}, {out / 'landscape2d_sam.png'}, "
        f"{out / 'report.png'}  ({result['seconds']:.0f} s)"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="SGD vs SAM on the embedded digits data set, with sharpness pictures",
        description="Train SGD and SAM on scikit-learn's bundled digits (no network, no files) "
        "with clean and 40% noisy labels over several seeds, print the test-error table "
        "(mean ± 95% CI), the Hessian's lambda_max of both solutions, and draw their loss "
        "landscapes. Finished runs in --out are reused.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p.add_argument("--config", default="demo-digits", help="the training config (default: bundled demo-digits)")
    p.set_defaults(handler=_demo)
