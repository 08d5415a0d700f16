"""Images per second of the image-folder input pipeline: decode + the standard transforms, through ``DataLoader``.

Writes ``--images`` JPEGs of ImageNet-like size (``--size``, default 500x375, quality 90; multi-scale noise so
that they compress like photographs, about 100 KB each) into a temporary image folder, or reads ``--dir`` (an
existing ``<dir>/<class>/*.jpg`` folder, e.g. a copy of part of ImageNet), then times every variant with each
``--workers`` count of ``torch.utils.data.DataLoader`` worker processes::

    OMP_NUM_THREADS=1 python benchmarks/bench_decode.py --workers 1 2 --json bench_decode.json

Variants: the training transform (Inception crop to 224 + flip) with a full decode, and with the JPEG decoded at
1/2, 1/4 or 1/8 scale where the crop allows (``dct_scaling``: Pillow's ``draft``, simplejpeg's ``min_factor``);
the evaluation transform (shorter side 256, central 224) likewise; each with Pillow and, where installed,
simplejpeg; and NVIDIA DALI's decoder (``decoder: dali``, where installed), whose "workers" are its decoding
threads in this process (on ``--device cuda`` it decodes on the GPU, else its batches stay on the CPU too). A pass
over the folder warms the workers up (they are started once, ``persistent_workers``), then ``--repeats`` timed
passes; the figure is the median pass's images/s. With 0 workers (decoding in this process) and for DALI the CPU
time per image is reported too: on a machine shared with other work it is the steadier figure, and cores / (CPU
time per image) bounds what the workers can deliver.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sharpness.harness.data.dali_decode import DaliBatches, DaliEvalSpec, DaliTrainSpec
from sharpness.harness.data.imagefolder import (
    EpochSampler,
    EvalTransform,
    ImageFolderDataset,
    ImageList,
    ShardSampler,
    TrainTransform,
    make_loader,
    read_split,
)

from provenance import run_info


def write_folder(root: Path, images: int, size: tuple[int, int], classes: int = 4, seed: int = 0) -> float:
    """``images`` JPEGs in ``classes`` class folders under ``root``; returns their mean size in KB."""
    rng = np.random.default_rng(seed)
    width, height = size
    total = 0
    for i in range(images):
        pixels = np.zeros((height, width, 3))
        for cells, amplitude in ((4, 90.0), (16, 60.0), (64, 45.0), (256, 40.0)):
            coarse = rng.normal(0, amplitude, (max(1, cells * height // width), cells, 3))
            layer = Image.fromarray(coarse.astype(np.float32)[:, :, 0]).resize(size, Image.Resampling.BICUBIC)
            pixels += np.asarray(layer)[:, :, None] * rng.uniform(0.6, 1.4, 3)
        pixels += rng.normal(0, 8, pixels.shape) + 128
        path = root / f"class{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total / images / 1024


def time_passes(
    batches: Any, sampler: EpochSampler | ShardSampler, repeats: int, device: torch.device | None = None
) -> tuple[list[float], list[float]]:
    """images/s of each timed pass over ``batches`` (after one untimed pass; a training ``sampler`` moves to the
    next epoch before each), and this process's CPU ms per image in each."""
    rates, cpu_ms = [], []
    for epoch in range(repeats + 1):
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch)
        start, cpu = time.perf_counter(), time.process_time()
        count = sum(len(y) for _, y in batches)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch:
            rates.append(count / (time.perf_counter() - start))
            cpu_ms.append(1e3 * (time.process_time() - cpu) / count)
    return rates, cpu_ms


def time_variant(
    dataset: ImageFolderDataset, train: bool, workers: int, batch: int, repeats: int
) -> tuple[list[float], list[float]]:
    """:func:`time_passes` of a ``DataLoader`` with ``workers`` processes (the CPU time is meaningful with 0
    workers, where this process does the decoding)."""
    n = len(dataset)
    sampler = EpochSampler(n, batch, seed=0) if train else ShardSampler(n)
    return time_passes(make_loader(dataset, sampler, batch, workers=workers, prefetch_factor=2), sampler, repeats)


def time_dali(
    images: ImageList, train: bool, threads: int, batch: int, repeats: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """:func:`time_passes` of DALI's decoder with ``threads`` decoding threads (in this process, so the CPU time
    per image counts them)."""
    n = len(images)
    sampler = EpochSampler(n, batch, seed=0) if train else ShardSampler(n)
    spec = DaliTrainSpec() if train else DaliEvalSpec()
    return time_passes(DaliBatches(images, sampler, spec, batch, device, max(1, threads)), sampler, repeats, device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="an existing <dir>/<class>/*.jpg folder")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoders", nargs="+", default=["pillow", "simplejpeg", "dali"])
    parser.add_argument("--device", default="cpu", help="where DALI decodes: cpu or cuda")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    optional = {"simplejpeg": "simplejpeg", "dali": "nvidia.dali"}
    decoders = [d for d in args.decoders if d not in optional or _installed(optional[d])]
    info = run_info("bench_decode")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir
        kb = None
        if root is None:
            root = Path(tmp) / "images"
            kb = write_folder(root, args.images, tuple(args.size))
        images = read_split(root.parent, root.name)
        variants = []
        for decoder in decoders:
            if decoder == "dali":
                variants += [("train dali", True, decoder, None), ("eval  dali", False, decoder, None)]
                continue
            for dct in (False, True):
                variants.append(
                    (f"train {decoder}{' dct' if dct else ''}", True, decoder, TrainTransform(dct_scaling=dct))
                )
            for dct in (False, True):
                variants.append(
                    (f"eval  {decoder}{' dct' if dct else ''}", False, decoder, EvalTransform(dct_scaling=dct))
                )
        print(f"{len(images)} images" + (f" of {args.size[0]}x{args.size[1]}, {kb:.0f} KB mean" if kb else ""), end="")
        print(f"; batch {args.batch}; torch {torch.__version__}; {info['platform']}; {info['date']}")
        print(f"{'variant':24s} {'workers':>7s} {'images/s':>9s} {'min-max':>13s} {'CPU ms/image':>12s}")
        rows = []
        for name, train, decoder, transform in variants:
            for workers in args.workers:
                if decoder == "dali":  # threads in this process: its CPU time counts them at any number
                    if workers == 0:
                        continue
                    rates, cpu_ms = time_dali(
                        images, train, workers, args.batch, args.repeats, torch.device(args.device)
                    )
                else:
                    dataset = ImageFolderDataset(images, transform, seed=0, decoder=decoder)
                    rates, cpu_ms = time_variant(dataset, train, workers, args.batch, args.repeats)
                row = {"variant": name, "workers": workers, "images_per_s": rates}
                in_process = workers == 0 or decoder == "dali"
                cpu = f"{statistics.median(cpu_ms):12.2f}" if in_process else ""
                if in_process:
                    row["cpu_ms_per_image"] = cpu_ms
                rows.append(row)
                spread = f"{min(rates):6.0f}-{max(rates):<6.0f}"
                print(f"{name:24s} {workers:7d} {statistics.median(rates):9.0f} {spread} {cpu}")
                sys.stdout.flush()
    if args.json:
        setup = {"images": len(images), "size": args.size, "mean_kb": kb, "batch": args.batch, "dir": str(args.dir)}
        args.json.write_text(json.dumps({**info, "setup": setup, "rows": rows}, indent=2) + "\n")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (nvidia) is missing
        return False


if __name__ == "__main__":
    main()
