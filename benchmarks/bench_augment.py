"""Time the batch augmentations of :mod:`sharpness.harness.augment` against kornia's equivalents.

A batch of 256 uint8 32x32x3 images; each variant runs ``--warmup`` times, then ``--repeats`` timed
runs (CUDA synchronised), and the table gives the median and the interquartile range in milliseconds::

    python benchmarks/bench_augment.py --device cpu --threads 1
    python benchmarks/bench_augment.py --device cuda

Kornia variants take float [0, 1] input (its API); the uint8 -> float conversion is timed with them.
On CUDA the hand-written pipelines are also run once under ``torch.cuda.set_sync_debug_mode("error")``,
which raises if they synchronise with the host.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import kornia
import kornia.augmentation as K
import torch
from kornia.augmentation.auto import AutoAugment

from sharpness.harness.augment import (
    AUGMENTATIONS,
    AutoAugmentPolicy,
    build_augmentation,
    cutout,
    random_crop_flip,
)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _time(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def variants(x: torch.Tensor, gen: torch.Generator) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed callables, keyed by table row."""
    dev = x.device
    xf = x.float() / 255
    k_crop_flip = K.AugmentationSequential(K.RandomCrop((32, 32), padding=4), K.RandomHorizontalFlip()).to(dev)
    # A fixed 16x16 box: scale = 256 / 1024 of the area, aspect 1 (kornia keeps it inside the image).
    k_erase = K.RandomErasing(scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0.0, p=1.0).to(dev)
    k_auto = AutoAugment("cifar10").to(dev)
    ours_auto = AutoAugmentPolicy("cifar10", 32, [255 * m for m in MEAN]).to(dev)
    ours_dense = AutoAugmentPolicy("cifar10", 32, [255 * m for m in MEAN], dense=True).to(dev)
    pipelines = {name: build_augmentation(name, MEAN, STD, image_size=32).to(dev) for name in AUGMENTATIONS}
    return {
        "crop+flip  hand (uint8 gather)": lambda: random_crop_flip(x, 4, gen),
        "crop+flip  kornia (float)": lambda: k_crop_flip(x.float() / 255),
        "cutout     hand (mask)": lambda: cutout(xf, 16, gen),
        "cutout     kornia RandomErasing": lambda: k_erase(xf),
        "autoaug    hand (per-image)": lambda: ours_auto(x.float(), gen),
        "autoaug    hand dense (GPU path)": lambda: ours_dense(x.float(), gen),
        "autoaug    kornia (per-batch)": lambda: k_auto(x.float() / 255),
        "pipeline   none": lambda: pipelines["none"](x, gen),
        "pipeline   basic": lambda: pipelines["basic"](x, gen),
        "pipeline   cutout": lambda: pipelines["cutout"](x, gen),
        "pipeline   autoaugment": lambda: pipelines["autoaugment"](x, gen),
    }


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every variant, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)
    table = variants(x, gen)
    print(f"device={device} batch={args.batch}x3x32x32 threads={torch.get_num_threads()}", end=" ")
    print(f"torch={torch.__version__} kornia={kornia.__version__}")
    print(f"{'variant':34s} {'median ms':>10s} {'IQR ms':>14s}")
    for name, fn in table.items():
        times = _time(fn, device, args.warmup, args.repeats)
        q1, _, q3 = statistics.quantiles(times, n=4)
        print(f"{name:34s} {statistics.median(times):10.2f} {q1:6.2f}-{q3:6.2f}")
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        for name in ("pipeline   none", "pipeline   basic", "pipeline   cutout", "pipeline   autoaugment"):
            table[name]()
        torch.cuda.set_sync_debug_mode(0)
        print("hand-written pipelines ran with sync_debug_mode='error': no host synchronisation")


if __name__ == "__main__":
    main()
