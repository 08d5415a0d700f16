"""decoder: dali (NVIDIA DALI) on the CPU: the crops and flips are the Pillow path's draws, the pixels within a few
grey levels of Pillow's, passes and resumes deterministic, unreadable files named, a missing DALI explained."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sharpness.harness.data.dali_decode import DaliBatches, DaliEvalSpec, DaliTrainSpec, require_dali
from sharpness.harness.data.imagefolder import (
    EpochSampler,
    EvalTransform,
    ImageFolderDataset,
    ImageReadError,
    ShardSampler,
    TrainTransform,
    read_split,
)

CPU = torch.device("cpu")


# The test extra installs DALI on Linux x86_64, so this never skips there (test_dali_installed.py checks it).
dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI has wheels for Linux x86_64 and aarch64 only")


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth picture (a 5x4 random grid, bilinearly enlarged): resampling differences stay small on it."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dali")
    for i in range(12):
        cls = ("cat", "dog", "emu")[i % 3]
        path = root / cls / f"{i}.{'png' if i % 4 == 3 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        size = (64 + 8 * (i % 3), 48 + 4 * (i % 2))  # landscape and a few widths
        _photo(i, size).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    return root


def _train(folder: Path, batch: int = 4, seed: int = 5, flip: bool = True, threads: int = 1):
    images = read_split(folder.parent, folder.name)
    sampler = EpochSampler(len(images), batch, seed)
    return images, sampler, DaliBatches(images, sampler, DaliTrainSpec(24, seed, flip), batch, CPU, threads)


def _collect(batches: DaliBatches) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_training_crops_and_flips_are_the_pillow_paths_draws(folder: Path) -> None:
    images, sampler, batches = _train(folder)
    sampler.set_epoch(2)
    x, y = _collect(batches)
    assert x.dtype == torch.uint8 and x.shape == (12, 3, 24, 24)
    reference = ImageFolderDataset(images, TrainTransform(24, dct_scaling=False), seed=5)
    keys = list(sampler)
    for i, (epoch, index) in enumerate(keys):
        pillow, label = reference[(epoch, index)]
        assert int(y[i]) == label
        diff = (x[i].float() - pillow.float()).abs()
        mirrored = (x[i].float() - pillow.flip(-1).float()).abs()
        assert diff.mean() < 1.0, (index, float(diff.mean()))  # the same box: under a grey level apart
        if (pillow.flip(-1) != pillow).any():  # the same flip: the mirrored reference is much further
            assert mirrored.mean() > diff.mean() + 4.0, (index, float(diff.mean()), float(mirrored.mean()))


def test_without_flip_nothing_is_mirrored_and_later_draws_do_not_shift(folder: Path) -> None:
    images, sampler, batches = _train(folder, flip=False)
    sampler.set_epoch(0)
    x, _ = _collect(batches)
    reference = ImageFolderDataset(images, TrainTransform(24, flip=False, dct_scaling=False), seed=5)
    for i, key in enumerate(sampler):
        assert (x[i].float() - reference[key][0].float()).abs().mean() < 1.0


def test_passes_are_deterministic_and_a_resume_sees_the_same_tail(folder: Path) -> None:
    _, sampler, batches = _train(folder, threads=2)
    sampler.set_epoch(1)
    first = list(batches)
    sampler.set_epoch(1)
    again = list(batches)
    sampler.set_epoch(1, start_batch=2)
    tail = list(batches)
    assert len(first) == 3 and len(tail) == 1
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(tail[0][0], first[2][0]) and torch.equal(tail[0][1], first[2][1])
    sampler.set_epoch(2)
    assert not torch.equal(_collect(batches)[0], torch.cat([x for x, _ in first]))  # another epoch, other crops


def test_evaluation_is_the_central_crop_of_the_resized_image(folder: Path) -> None:
    images = read_split(folder.parent, folder.name)
    shards = ShardSampler(len(images))
    batches = DaliBatches(images, shards, DaliEvalSpec(24, 28), 5, CPU, 1)
    assert len(batches) == 3
    x, y = _collect(batches)
    again, _ = _collect(batches)
    assert torch.equal(x, again) and x.shape == (12, 3, 24, 24)
    reference = ImageFolderDataset(images, EvalTransform(24, 28))
    for i in range(len(images)):
        pillow, label = reference[i]
        assert int(y[i]) == label
        assert (x[i].float() - pillow.float()).abs().mean() < 1.0, i


def test_ranks_share_the_global_batch(folder: Path) -> None:
    images = read_split(folder.parent, folder.name)
    whole = EpochSampler(len(images), 4, 5)
    whole.set_epoch(3)
    x, _ = _collect(DaliBatches(images, whole, DaliTrainSpec(24, 5), 4, CPU))
    parts = []
    for rank in range(2):
        sampler = EpochSampler(len(images), 4, 5, rank=rank, world_size=2)
        sampler.set_epoch(3)
        parts.append(list(DaliBatches(images, sampler, DaliTrainSpec(24, 5), 2, CPU)))
    for b in range(3):
        assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), x[4 * b : 4 * b + 4])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unreadable_file_is_named(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "train"
    for i in range(4):
        (root / "a").mkdir(parents=True, exist_ok=True)
        _photo(i, (40, 30)).save(root / "a" / f"{i}.jpg")
    bad = root / "a" / "2.jpg"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    images = read_split(tmp_path, "train")
    sampler = EpochSampler(len(images), 4, 0)
    with pytest.raises(ImageReadError, match=f"^{bad}: cannot read image"):
        list(DaliBatches(images, sampler, DaliTrainSpec(16, 0), 4, CPU))


def test_a_missing_dali_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"decoder 'dali' needs NVIDIA DALI: pip install 'sharpness\[dali\]'"):
        require_dali()


def test_a_sampler_and_a_spec_must_match(folder: Path) -> None:
    images = read_split(folder.parent, folder.name)
    with pytest.raises(ValueError, match="an EpochSampler goes with a DaliTrainSpec"):
        DaliBatches(images, ShardSampler(len(images)), DaliTrainSpec(), 4, CPU)
