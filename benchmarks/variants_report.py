"""The variants' table and plot of docs/variants.md from ``sharpness compare`` runs: error against cost.

For each experiment folder (one ``sharpness compare ... --methods ...`` output) and method: the test error's mean
± 95% CI over seeds, the share of noisy labels fitted, the forward-backward passes per step, the gain kept,
``(SGD error - method error) / (SGD error - SAM error)`` (only where SAM clearly beats SGD: the 95% interval of
the per-seed differences excludes 0), and the cost relative to SGD. The cost is the time per step relative to SGD that
``bench_variants.py`` measured (``--bench``: every method alternated in one process on the same model and batch
shape); without it, the median over seeds of the run's training CPU time over SGD's of the same seed, which on a
shared machine still moves with the other processes' load (the JSON has it, and the wall-clock ratio, in every
case).

    python benchmarks/variants_report.py runs/fmnist-noise40 runs/fmnist-clean --bench bench.json \
        --png docs/variants.png --json variants_results.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sharpness.harness.report import collect_summaries, mean_ci


def summarise(folder: Path, bench: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-method figures of one experiment folder; ``bench`` maps a method to its time per step relative to SGD
    from ``bench_variants.py`` (the cost then reported), else the runs' CPU-time ratio is."""
    runs: dict[str, dict[int, dict]] = {}
    for s in collect_summaries([folder]):
        runs.setdefault(s["method"], {})[s["seed"]] = s
    if "sgd" not in runs or "sam" not in runs:
        raise ValueError(f"{folder}: needs sgd and sam runs (has {sorted(runs)})")
    sgd = runs["sgd"]
    rows = {}
    for method, by_seed in runs.items():
        errors = [s["metrics"]["test_error"] for s in by_seed.values()]
        mean, ci = mean_ci(errors)
        cpu = [
            s["metrics"]["train_cpu_seconds"] / sgd[k]["metrics"]["train_cpu_seconds"]
            for k, s in by_seed.items()
            if k in sgd
        ]
        wall = [
            s["metrics"]["train_seconds"] / sgd[k]["metrics"]["train_seconds"] for k, s in by_seed.items() if k in sgd
        ]
        fitted = [s["metrics"].get("noisy_labels_fitted") for s in by_seed.values()]
        rows[method] = {
            "n": len(errors),
            "test_error": mean,
            "ci": ci,
            "errors": errors,
            "cost": bench.get(method, bench[_method(method)]) if bench else statistics.median(cpu),
            "cost_cpu": statistics.median(cpu),
            "cost_wall": statistics.median(wall),
            "passes_per_step": statistics.mean(s["metrics"]["passes_per_step"] for s in by_seed.values()),
            "noisy_labels_fitted": statistics.mean(fitted) if all(f is not None for f in fitted) else None,
        }
    sgd_row, sam_row = rows["sgd"], rows["sam"]
    gap = sgd_row["test_error"] - sam_row["test_error"]
    # Meaningless where SAM does not clearly beat SGD: the 95% interval of their per-seed differences (the runs of
    # one seed share data, noise and order) must exclude 0; one seed has no interval.
    diffs = [
        s["metrics"]["test_error"] - runs["sam"][k]["metrics"]["test_error"] for k, s in sgd.items() if k in runs["sam"]
    ]
    diff, diff_ci = mean_ci(diffs)
    clear = len(diffs) > 1 and diff - diff_ci > 0
    for row in rows.values():
        row["gain_kept"] = (sgd_row["test_error"] - row["test_error"]) / gap if clear else math.nan
    experiment = next(iter(next(iter(runs.values())).values()))["experiment"]
    return {"folder": str(folder), "experiment": experiment, "rows": rows, "sam_gain": [diff, diff_ci, len(diffs)]}


ORDER = ("sgd", "sam", "gsam", "fsam", "vasso", "esam", "looksam", "interval", "stochastic", "aesam", "msam", "random")


def _method(label: str) -> str:
    """The method behind a run's label (``looksam-a0.2`` is LookSAM with other options)."""
    return label.split("-")[0]


def markdown(results: list[dict[str, Any]]) -> str:
    methods = [m for m in ORDER if all(m in r["rows"] for r in results)]
    methods += sorted({m for r in results for m in r["rows"]} - set(methods))
    head = "| method | passes/step | cost vs SGD |"
    rule = "|---|---:|---:|"
    for r in results:
        head += f" {Path(r['folder']).name}: test error % | gain kept |"
        rule += "---:|---:|"
        if any(row["noisy_labels_fitted"] is not None for row in r["rows"].values()):
            head += " noisy labels fitted % |"
            rule += "---:|"
    lines = [head, rule]
    for m in methods:
        first = next(r["rows"][m] for r in results if m in r["rows"])
        line = f"| {m} | {first['passes_per_step']:.2f} | {first['cost']:.2f} |"
        for r in results:
            row = r["rows"].get(m)
            if row is None:
                line += " – | – |"
                continue
            ci = "" if math.isnan(row["ci"]) else f" ± {row['ci']:.2f}"
            gain = "–" if math.isnan(row["gain_kept"]) else f"{row['gain_kept']:+.0%}"
            line += f" {row['test_error']:.2f}{ci} (n={row['n']}) | {gain} |"
            if any(x["noisy_labels_fitted"] is not None for x in r["rows"].values()):
                fitted = row["noisy_labels_fitted"]
                line += f" {fitted:.1f} |" if fitted is not None else " – |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    fig = Figure(figsize=(5.2 * len(results), 4.2), layout="tight")
    for k, r in enumerate(results):
        ax = fig.add_subplot(1, len(results), k + 1)
        top = r["rows"]["sgd"]["test_error"] + 8  # a diverged method would squash the others: drawn at the top
        placed: list[tuple[float, float]] = []
        for method, row in r["rows"].items():
            error, off = min(row["test_error"], top), row["test_error"] > top
            ax.errorbar(
                row["cost"],
                error,
                yerr=0 if math.isnan(row["ci"]) or off else row["ci"],
                fmt="^" if off else "o",
                capsize=3,
                color="C3" if method in ("sgd", "sam") else "C0",
            )
            label = f"{method} ({row['test_error']:.1f}, off the scale)" if off else method
            near = sum(abs(row["cost"] - c) < 0.06 and abs(error - e) < 0.8 for c, e in placed)
            placed.append((row["cost"], error))  # each label near an earlier point goes one line lower
            ax.annotate(label, (row["cost"], error), textcoords="offset points", xytext=(4, 3 - 10 * near), fontsize=8)
        ax.set_xlabel("time per step relative to SGD")
        ax.set_ylabel("test error (%), mean and 95% CI")
        ax.set_title(Path(r["folder"]).name)
        ax.grid(alpha=0.3)
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="sharpness compare output folders")
    parser.add_argument("--png", type=Path, help="error-against-cost plot")
    parser.add_argument("--json", type=Path, help="all figures as JSON")
    parser.add_argument("--bench", type=Path, help="a bench_variants.py JSON: its time per step vs SGD is the cost")
    parser.add_argument("--bench-model", default="cnn-small-1x28", help="the model of --bench to read")
    args = parser.parse_args(argv)
    bench = None
    if args.bench:
        found = json.loads(args.bench.read_text())["results"]
        (model,) = [r for r in found if r["model"] == args.bench_model]
        bench = {row["method"]: row["time_vs_sgd"] for row in model["rows"]}
    results = [summarise(folder, bench) for folder in args.folders]
    print(markdown(results), end="")
    if args.png:
        plot(results, args.png)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
