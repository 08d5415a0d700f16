"""In-memory data at a pretrained model's resolution (``upscale_to``, ``normalization``): Table 3's CIFAR rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sharpness.harness.augment import build_augmentation
from sharpness.harness.config import ConfigError, TrainConfig, load_config
from sharpness.harness.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from sharpness.harness.prepare import input_statistics, prepare_data
from sharpness.harness.runs import load_run
from sharpness.harness.train import train


def _bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a (C, H, W) float64 array to (C, size, size) with half-pixel centres: output pixel ``i``
    samples the input at ``(i + 1/2) * H / size - 1/2``, clamped to the image (the convention of
    ``align_corners=False``), written out here in float64."""

    def weights(n_in: int) -> np.ndarray:
        w = np.zeros((size, n_in))
        for i in range(size):
            src = max((i + 0.5) * n_in / size - 0.5, 0.0)
            lo = min(int(np.floor(src)), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            frac = src - lo
            w[i, lo] += 1 - frac
            w[i, hi] += frac
        return w

    rows, cols = weights(image.shape[1]), weights(image.shape[2])
    return np.einsum("ih,chw,jw->cij", rows, image, cols)


def test_normalize_then_upscale_matches_a_float64_bilinear_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8, generator=gen)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    aug = build_augmentation("none", mean, std, image_size=5, output_size=12)
    out = aug.normalize(x)
    assert out.shape == (2, 3, 12, 12) and out.dtype == torch.float32
    m, s = np.array(mean)[:, None, None], np.array(std)[:, None, None]
    for i in range(2):
        ref = _bilinear_reference((x[i].double().numpy() / 255 - m) / s, 12)
        np.testing.assert_allclose(out[i].double().numpy(), ref, atol=1e-5)


def test_augmented_batches_are_upscaled_after_crop_flip_and_cutout() -> None:
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    plain = build_augmentation("cutout", (0.5,) * 3, (0.25,) * 3, image_size=8, cutout_size=4)
    big = build_augmentation("cutout", (0.5,) * 3, (0.25,) * 3, image_size=8, cutout_size=4, output_size=20)
    small = plain(x, generator=torch.Generator().manual_seed(3))
    upscaled = big(x, generator=torch.Generator().manual_seed(3))
    assert upscaled.shape == (4, 3, 20, 20)
    for i in range(4):  # the same draws, then the resize: crop, flip and Cutout act at the stored size
        ref = _bilinear_reference(small[i].double().numpy(), 20)
        np.testing.assert_allclose(upscaled[i].double().numpy(), ref, atol=1e-5)


def test_config_keys_are_validated() -> None:
    assert TrainConfig(dataset="cifar10", upscale_to=600).upscale_to == 600
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="upscale_to"):
            TrainConfig(dataset="cifar10", upscale_to=bad)
    with pytest.raises(ConfigError, match="upscale_to: an option of the in-memory"):
        TrainConfig(dataset="imagefolder", augment="none", upscale_to=300)
    with pytest.raises(ConfigError, match="normalization must be one of"):
        TrainConfig(normalization="cifar")


def test_imagenet_statistics_need_rgb_images() -> None:
    digits = prepare_data(TrainConfig(dataset="digits")).dataset
    assert input_statistics(TrainConfig(dataset="digits"), digits) == (tuple(digits.mean), tuple(digits.std))
    with pytest.raises(ConfigError, match="needs RGB images; digits has 1 channel"):
        input_statistics(TrainConfig(dataset="digits", normalization="imagenet"), digits)
    assert (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_a_run_trains_and_evaluates_at_the_upscaled_size(tmp_path) -> None:
    """An MLP sized for 16x16 inputs accepts the 8x8 digits only if every batch, training and evaluation, is
    upscaled; the loaded run (the analysis tools' entry) upscales alike."""
    cfg = load_config(
        "demo-digits",
        ["epochs=1", "batch_size=128", "model=mlp", "upscale_to=16", "augment=basic", "method=sam"],
    )
    (summary,) = train(cfg, tmp_path / "run", progress=False)
    assert summary["metrics"]["test_error"] < 90.0
    run = load_run(tmp_path / "run", device="cpu")
    x, y = run.batches("test", batch_size=32, num_batches=1)[0]
    assert x.shape == (32, 1, 16, 16)
    with torch.no_grad():
        assert run.model(x).shape == (32, 10)
    with pytest.raises(RuntimeError):  # the same model refuses the stored size: the resize is what makes it fit
        run.model(torch.zeros(2, 1, 8, 8))
