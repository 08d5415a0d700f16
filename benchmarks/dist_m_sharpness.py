"""Paper Figure 3 (middle) at CPU scale: test error against m, two gloo ranks against one process.

Both arms train the same config (default ``cpu/digits-noise40``: digits with 40% symmetric label noise, cnn-small,
with ``--set`` changes applied to both) at the same global batch (``--batch``, default 256) and differ only in
where the subsets of m examples are perturbed (docs/distributed.md, "Evidence"):

- ``1 process``: ``m_sharpness: m`` (m < batch), plain SAM at m = batch.
- ``2 ranks``: ``torchrun --nproc-per-node 2``; each rank holds batch / 2 examples. m < batch / 2:
  ``perturbation: per_replica`` with ``m_sharpness: m`` inside each rank; m = batch / 2: ``per_replica`` alone
  (the paper's scheme: one perturbation per replica); m = batch: ``perturbation: global``.

Every run goes through the CLI (``python -m sharpness train``, under torchrun for the second arm) into
``--out/<arm>/m<m>-seed<s>``; a finished run is reused and a killed one resumed, so the script can be stopped and
started again. Runs go seed by seed, so that a stopped grid still has whole seeds. Then it prints a Markdown table
(mean ± 95% CI over seeds, Student t) and draws error against m (``--png``)::

    OMP_NUM_THREADS=1 python benchmarks/dist_m_sharpness.py --out runs/dist-m-sharpness --png docs/m.png
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from sharpness.harness.report import mean_ci

from provenance import run_info

ARMS = ("1 process", "2 ranks")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arm_settings(arm: str, m: int, batch: int) -> list[str]:
    """The config changes of ``arm`` at subset size ``m`` (beyond the shared ones)."""
    if arm == "1 process":
        return [] if m == batch else [f"m_sharpness={m}"]
    if m == batch:
        return ["perturbation=global"]
    return ["perturbation=per_replica"] + ([] if m == batch // 2 else [f"m_sharpness={m}"])


def command(arm: str, config: str, out: Path, sets: list[str]) -> list[str]:
    args = ["train", config, "--out", str(out), "--no-progress", *[x for s in sets for x in ("--set", s)]]
    if arm == "1 process":
        return [sys.executable, "-m", "sharpness", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    return [*launcher, "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "sharpness", *args]


def run_grid(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    shared = [f"batch_size={args.batch}", "device=cpu", *args.set]
    for seed in args.seeds:
        for m in args.m:
            for arm in ARMS:
                out = args.out / arm.replace(" ", "-") / f"m{m}-seed{seed}"
                if (out / "summary.json").is_file():
                    continue
                sets = [*shared, f"seed={seed}", *arm_settings(arm, m, args.batch)]
                cmd = command(arm, args.config, out, sets) + (["--resume"] if (out / "config.yaml").is_file() else [])
                started = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{arm} m={m} seed {seed} failed:\n{done.stderr[-3000:]}")
                print(f"{arm:9s} m={m:<4d} seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr)


def collect(args: argparse.Namespace) -> dict:
    rows = []
    for arm in ARMS:
        for m in args.m:
            summaries = [
                json.loads(f.read_text())
                for seed in args.seeds
                if (f := args.out / arm.replace(" ", "-") / f"m{m}-seed{seed}" / "summary.json").is_file()
            ]
            if not summaries:
                continue
            errors = [s["metrics"]["test_error"] for s in summaries]
            fitted = [s["metrics"].get("noisy_labels_fitted") for s in summaries]
            rows.append(
                {
                    "arm": arm,
                    "m": m,
                    "seeds": [s["seed"] for s in summaries],
                    "test_error": errors,
                    "test_error_mean_ci": mean_ci(errors),
                    "noisy_labels_fitted": fitted,
                    "noisy_labels_fitted_mean_ci": mean_ci(fitted) if None not in fitted else None,
                    "train_seconds": [s["seconds"] for s in summaries],
                    "settings": arm_settings(arm, m, args.batch),
                }
            )
    return {"config": args.config, "batch": args.batch, "set": args.set, "rows": rows}


def _cell(mean_ci_pair: tuple[float, float] | None) -> str:
    if mean_ci_pair is None:
        return "n/a"
    mean, ci = mean_ci_pair
    return f"{mean:.2f} ± {ci:.2f}"


def markdown(result: dict) -> str:
    lines = [
        "| m | arm | settings | seeds | test error (%) | noisy labels fitted (%) |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["m"], r["arm"])):
        settings = ", ".join(row["settings"]) or "(plain SAM)"
        lines.append(
            f"| {row['m']} | {row['arm']} | `{settings}` | {len(row['seeds'])} | {_cell(row['test_error_mean_ci'])} "
            f"| {_cell(row['noisy_labels_fitted_mean_ci'])} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.2), dpi=100)
    for arm, marker, shift in (("1 process", "o", 0.96), ("2 ranks", "s", 1.04)):
        rows = sorted((r for r in result["rows"] if r["arm"] == arm), key=lambda r: r["m"])
        if rows:
            xs = [r["m"] * shift for r in rows]
            means = [r["test_error_mean_ci"][0] for r in rows]
            cis = [r["test_error_mean_ci"][1] for r in rows]
            ax.errorbar(xs, means, yerr=cis, marker=marker, capsize=3, label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (examples per perturbation)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"digits, 40% label noise, batch {result['batch']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu/digits-noise40")
    parser.add_argument("--batch", type=int, default=256, help="global batch of both arms")
    parser.add_argument("--m", type=int, nargs="+", default=[4, 16, 64, 128, 256])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config change, both arms")
    parser.add_argument("--out", type=Path, default=Path("runs/dist-m-sharpness"))
    parser.add_argument("--png", type=Path)
    parser.add_argument("--json", type=Path, help="write the table's numbers and the provenance here")
    parser.add_argument("--report-only", action="store_true", help="only collect the finished runs")
    args = parser.parse_args()
    info = run_info("dist_m_sharpness")
    started = time.perf_counter()
    if not args.report_only:
        run_grid(args)
    result = collect(args)
    result["wall_seconds"] = time.perf_counter() - started
    result["provenance"] = info
    print(markdown(result))
    if args.png:
        plot(result, args.png)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
