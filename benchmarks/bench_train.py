"""Seconds per epoch of the training harness (:class:`sharpness.harness.train.Trainer`), SGD against SAM.

Each run trains a bundled config (default ``cifar10_wrn16-8_cutout``: WRN-16-8, CIFAR-10, batch 128, cutout,
bf16, channels-last) through the real ``Trainer`` into a temporary run directory and reads the per-epoch
``seconds`` that the trainer writes to ``metrics.jsonl`` (the training loop of one epoch; the evaluation at
the end of the epoch is not included). The first epoch carries the warm-up (allocator, cuDNN autotuning,
``torch.compile`` when the config asks for it), so the table reports it apart from the later epochs.

The target (one H100, WRN-16-8, CIFAR-10, batch 128, SAM, bf16) is at most 5 s per epoch::

    python benchmarks/bench_train.py --device cuda --data-dir ~/data --epochs 3 --json bench_train.json

Without the data set, ``--synthetic`` trains on random uint8 images of CIFAR-10's shape and size (written to
a temporary ``cifar10.npz``, the documented ``x_train, y_train, x_test, y_test`` format, which the trainer
then loads like the real file; the speed does not depend on the pixel values). A tiny CPU check::

    python benchmarks/bench_train.py --synthetic --device cpu --threads 1 --set model=resnet20 \\
        --set train_subset=2048 --epochs 2 --synthetic-test 500

With ``--repeats N`` the methods are run alternately (sgd, sam, sgd, sam, ...) and medians are taken over
all post-warm-up epochs of all repeats.

The trainer synchronises CUDA at the end of each epoch's loop before it reads its clock, so an epoch's
``seconds`` include all of its queued kernels (and none of the evaluation that follows). cuDNN autotuning is the
config key ``cudnn_benchmark`` (default true; ``--no-cudnn-benchmark`` turns it off for the runs).

On CUDA the script then runs a few training steps of each method through ``Trainer._step`` under
``torch.cuda.set_sync_debug_mode("error")`` and reports whether a step synchronised with the host (after two
warm-up steps, in which the optimizers allocate their state). CPU runs cannot check this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sharpness.harness.config import apply_overrides, load_config
from sharpness.harness.train import Trainer

from provenance import run_info

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
TARGET_SAM_SECONDS = 5.0


def write_synthetic_cifar10(folder: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random uint8 CIFAR-10-shaped arrays as ``folder/cifar10.npz`` (keys x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(seed)
    path = folder / "cifar10.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, n_train, dtype=np.int64),
        x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test, dtype=np.int64),
    )
    return path


def run_once(config, workdir: Path, label: str) -> dict[str, Any]:
    """Train ``config`` in a fresh run directory under ``workdir``; the per-epoch seconds and the run's wall time."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=workdir))
    trainer = Trainer(config, run_dir, progress=False)
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.run()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {
        "epoch_seconds": [line["seconds"] for line in lines],
        "wall_seconds": wall,
        "process_cpu_seconds": cpu,
        "images_per_epoch": trainer.steps_per_epoch * config.batch_size,
        "steps_per_epoch": trainer.steps_per_epoch,
        "device": str(trainer.device),
        "final_train_loss": lines[-1]["train_loss"],
    }


def sync_check(config, workdir: Path, steps: int = 3, warmup: int = 2) -> dict[str, Any]:
    """Whether a training step synchronises CUDA with the host: ``steps`` steps under sync debug mode "error"."""
    trainer = Trainer(config, Path(tempfile.mkdtemp(prefix="sync-", dir=workdir)), progress=False)
    trainer._setup()
    if trainer.steps_per_epoch < warmup + steps:
        return {"checked": False, "why": f"needs {warmup + steps} steps per epoch, has {trainer.steps_per_epoch}"}
    acc = trainer.zero_accumulators()
    batches = trainer.train_set.shuffled(config.batch_size, config.seed, 0)
    for _ in range(warmup):
        trainer._step(*next(batches), acc)
    torch.cuda.synchronize(trainer.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            trainer._step(*next(batches), acc)
        result: dict[str, Any] = {"checked": True, "synchronises": False, "steps": steps}
    except RuntimeError as err:
        result = {"checked": True, "synchronises": True, "steps": steps, "error": str(err).splitlines()[0]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(trainer.device)
    return result


def summarise(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    first = [r["epoch_seconds"][0] for r in runs]
    later = [s for r in runs for s in r["epoch_seconds"][1:]]
    images = runs[0]["images_per_epoch"]
    row: dict[str, Any] = {
        "method": method,
        "device": runs[0]["device"],
        "images_per_epoch": images,
        "steps_per_epoch": runs[0]["steps_per_epoch"],
        "first_epoch_s": first,
        "later_epochs_s": later,
        "wall_s": [r["wall_seconds"] for r in runs],
        "process_cpu_s": [r["process_cpu_seconds"] for r in runs],
        "final_train_loss": [r["final_train_loss"] for r in runs],
    }
    if later:
        median = statistics.median(later)
        row.update(median_s=median, min_s=min(later), max_s=max(later), images_per_s=images / median)
    return row


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    print(header)
    print(f"{'method':8s} {'device':8s} {'first epoch s':>14s} {'median later s':>15s}", end=" ")
    print(f"{'min-max s':>17s} {'images/s':>10s}")
    for row in rows:
        first = statistics.median(row["first_epoch_s"])
        if "median_s" in row:
            spread = f"{row['min_s']:.3f}-{row['max_s']:.3f}"
            print(
                f"{row['method']:8s} {row['device']:8s} {first:14.3f} {row['median_s']:15.3f} {spread:>17s} "
                f"{row['images_per_s']:10.0f}"
            )
        else:
            print(f"{row['method']:8s} {row['device']:8s} {first:14.3f} {'(need --epochs >= 2)':>15s}")
    for row in rows:
        firsts = ", ".join(f"{x:.3f}" for x in row["first_epoch_s"])
        later = ", ".join(f"{x:.3f}" for x in row["later_epochs_s"])
        print(f"{row['method']}: first epochs [{firsts}] s, later epochs [{later}] s")
        if row["method"] == "sam" and row["device"].startswith("cuda") and "median_s" in row:
            verdict = "met" if row["median_s"] <= TARGET_SAM_SECONDS else "NOT met"
            print(f"target (WRN-16-8, SAM, bf16, one H100): <= {TARGET_SAM_SECONDS} s/epoch: {verdict} on this device")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar10_wrn16-8_cutout", help="bundled config name or YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)")
    parser.add_argument("--data-dir", default=None, help="folder holding the data set (ignored with --synthetic)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the first is warm-up (default 2)")
    parser.add_argument("--methods", nargs="+", default=["sgd", "sam"], choices=["sgd", "sam"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per method, interleaved (default 1)")
    parser.add_argument("--synthetic", action="store_true", help="random CIFAR-10-shaped data, no files needed")
    parser.add_argument(
        "--synthetic-test", type=int, default=CIFAR_TEST, help="test images of the synthetic set (default 10000)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU timing: 1)")
    parser.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shorthand for --set cudnn_benchmark=true/false (default: the config's, true)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = run_info("bench_train")  # before the runs: the code they import is the code of this moment
    base = load_config(args.config, args.set)
    overrides = [f"epochs={args.epochs}", f"device={args.device}"]
    if base.warmup_epochs > args.epochs:  # the warm-up's length does not change the time of a step
        overrides.append(f"warmup_epochs={args.epochs}")
    if args.cudnn_benchmark is not None:
        overrides.append(f"cudnn_benchmark={str(args.cudnn_benchmark).lower()}")
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        workdir = Path(tmp)
        if args.synthetic:
            if base.dataset != "cifar10":
                parser.error(f"--synthetic writes CIFAR-10-shaped data; the config's dataset is {base.dataset}")
            n_train = base.train_subset or CIFAR_TRAIN
            data_dir = workdir / "data"
            data_dir.mkdir()
            write_synthetic_cifar10(data_dir, n_train, args.synthetic_test)
            overrides.append(f"data_dir={data_dir}")
        elif args.data_dir is not None:
            overrides.append(f"data_dir={args.data_dir}")
        configs = {m: apply_overrides(base, [*overrides, f"method={m}"]) for m in args.methods}
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
        for repeat in range(args.repeats):
            order = args.methods if repeat % 2 == 0 else list(reversed(args.methods))
            for method in order:
                runs[method].append(run_once(configs[method], workdir, method))
                print(
                    f"  run {repeat + 1}/{args.repeats} {method}: {runs[method][-1]['epoch_seconds']}", file=sys.stderr
                )
        on_cuda = runs[args.methods[0]][0]["device"].startswith("cuda")
        syncs = {m: sync_check(configs[m], workdir) for m in args.methods} if on_cuda else {}

    rows = [summarise(m, runs[m]) for m in args.methods]
    cfg = configs[args.methods[0]]
    device_name = rows[0]["device"]
    if device_name.startswith("cuda"):
        device_name += f" ({torch.cuda.get_device_name(torch.device(device_name))})"
    header = (
        f"config={args.config} model={cfg.model} batch={cfg.batch_size} precision={cfg.precision} "
        f"channels_last={cfg.channels_last} compile={cfg.compile} augment={cfg.augment} "
        f"data={'synthetic' if args.synthetic else 'real'} images/epoch={rows[0]['images_per_epoch']} "
        f"device={device_name} threads={torch.get_num_threads()} cudnn_benchmark={cfg.cudnn_benchmark} "
        f"torch={torch.__version__}"
    )
    print_table(rows, header)
    for method, check in syncs.items():
        if not check["checked"]:
            print(f"sync check {method}: not run ({check['why']})")
        elif check["synchronises"]:
            print(f"sync check {method}: a training step SYNCHRONISED with the host: {check['error']}")
        else:
            print(f"sync check {method}: {check['steps']} training steps ran without a host synchronisation")
    if not syncs:
        print("sync check: CUDA only (torch.cuda.set_sync_debug_mode); not run on this device")
    result = {
        **info,
        "device": device_name,
        "threads": torch.get_num_threads(),
        "cudnn_benchmark": cfg.cudnn_benchmark,
        "sync_check": syncs,
        "synthetic": args.synthetic,
        "config_name": args.config,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("method", "data_dir")},
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
