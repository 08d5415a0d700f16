"""Time of a 2-D loss landscape, grid points one by one against ``points_per_batch`` points per forward pass.

:func:`sharpness.analysis.landscape_2d` evaluates ``points_per_batch=P`` grid points in one forward pass per
batch (``torch.vmap`` over ``torch.func.functional_call``; see ``sharpness.analysis.batched_eval``). This
script times the same grid for each P given, on one model (BatchNorm in eval mode, the case the batched path
serves) and random data, and checks that every P gives the losses of P = 1 (the largest relative difference
is printed). Times are the best of ``--repeats`` runs, the P values alternating; CUDA is synchronised around
each run.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_landscape.py --device cpu --threads 1``;
``python benchmarks/bench_landscape.py --device cuda --json landscape_cuda.json`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sharpness.analysis import landscape_2d
from sharpness.harness.models import build_model

from provenance import run_info


def clock(fn, device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet20", help="a harness model name (default resnet20)")
    parser.add_argument("--grid", type=int, default=11, help="points per axis (default 11: 121 points)")
    parser.add_argument("--batches", type=int, default=2, help="evaluation batches (default 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--points", type=int, nargs="+", default=[1, 4, 11], help="points_per_batch values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU timing: 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = run_info("bench_landscape")  # before the runs: the code they import is the code of this moment

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    model: nn.Module = build_model(args.model, 10).to(device).eval()
    batches = [
        (torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device), torch.randint(0, 10, (args.batch_size,)))
        for _ in range(args.batches)
    ]
    batches = [(x, y.to(device)) for x, y in batches]

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    def run(points: int) -> dict:
        return landscape_2d(
            model,
            loss_fn,
            batches,
            alphas=torch.linspace(-1, 1, args.grid),
            betas=torch.linspace(-1, 1, args.grid),
            points_per_batch=points,
            progress=False,
        )

    run(max(args.points))  # warm-up: allocator, vmap's first trace
    best = {p: float("inf") for p in args.points}
    results: dict[int, dict] = {}
    for repeat in range(args.repeats):
        for p in args.points if repeat % 2 == 0 else list(reversed(args.points)):
            seconds, results[p] = clock(lambda p=p: run(p), device)
            best[p] = min(best[p], seconds)
    reference = torch.tensor(results[args.points[0]]["loss"], dtype=torch.float64)
    rows = []
    for p in args.points:
        loss = torch.tensor(results[p]["loss"], dtype=torch.float64)
        rows.append(
            {
                "points_per_batch": p,
                "batched": results[p]["batched"],
                "seconds": best[p],
                "speedup": best[args.points[0]] / best[p],
                "max_rel_diff": float(((loss - reference).abs() / reference.abs()).max()),
            }
        )
    device_name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    print(
        f"model={args.model} grid={args.grid}x{args.grid} data={args.batches}x{args.batch_size} "
        f"device={device_name} threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats}"
    )
    print("| points per batch | batched | time (s) | speed-up over the first | max rel. diff. of the losses |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['points_per_batch']} | {r['batched']} | {r['seconds']:.3f} | {r['speedup']:.2f}x "
            f"| {r['max_rel_diff']:.1e} |"
        )
    out = {**info, "device": device_name, "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    out["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
