"""ArrayDataset, channel statistics, the data-set catalog and data-folder resolution."""

from pathlib import Path

import numpy as np
import pytest

from sharpness.harness.data import DATASETS, ArrayDataset, channel_stats, resolve_data_dir
from sharpness.harness.data.catalog import get_spec


def test_dataset_names():
    assert DATASETS == ("cifar10", "cifar100", "svhn", "svhn_extra", "mnist", "fashion_mnist", "digits")


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("CIFAR10", "cifar10"),
        ("Fashion-MNIST", "fashion_mnist"),
        ("fmnist", "fashion_mnist"),
        ("svhn", "svhn"),
    ],
)
def test_spec_aliases(alias, name):
    assert get_spec(alias).name == name


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match=r"unknown data set 'imagenet'; choose one of cifar10, cifar100, svhn"):
        get_spec("imagenet")


def test_channel_stats_exact_small_case():
    images = np.array([[[[0, 255, 51]]], [[[255, 255, 153]]]], dtype=np.uint8)
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.5, 1.0, 0.4), abs=1e-15)
    assert std == pytest.approx((0.5, 0.0, 0.2), abs=1e-15)


def test_channel_stats_match_float64_over_several_chunks():
    images = np.random.default_rng(0).integers(0, 256, size=(5000, 4, 3, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    scaled = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, scaled.mean(axis=0), rtol=0, atol=1e-13)
    np.testing.assert_allclose(std, scaled.std(axis=0), rtol=0, atol=1e-13)


def test_from_arrays_adds_channel_axis_and_casts_labels():
    x = np.arange(2 * 2 * 2, dtype=np.uint8).reshape(2, 2, 2)
    data = ArrayDataset.from_arrays("toy", x, np.array([0, 1], np.uint8), x[:1], np.array([1], np.int32), 2)
    assert data.x_train.shape == (2, 2, 2, 1) and data.x_test.shape == (1, 2, 2, 1)
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    assert data.y_test.tolist() == [1]
    assert data.image_shape == (2, 2, 1) and data.num_channels == 1
    assert data.mean == pytest.approx((3.5 / 255,), abs=1e-15)
    assert repr(data) == "ArrayDataset(name='toy', train=2, test=1, image_shape=(2, 2, 1), num_classes=2)"


def test_dataset_rejects_bad_arrays():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    y = np.zeros(2, np.int64)
    stats = ((0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ValueError, match=r"x_train must be uint8 of shape \(N, H, W, 1 or 3\), got float32"):
        ArrayDataset("bad", x.astype(np.float32), y, x, y, 2, *stats)
    with pytest.raises(ValueError, match=r"y_test must be int64 of shape \(2,\), got int32 \(2,\)"):
        ArrayDataset("bad", x, y, x, y.astype(np.int32), 2, *stats)
    with pytest.raises(ValueError, match="differ in shape"):
        ArrayDataset("bad", x, y, x[:, :3], y, 2, *stats)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        ArrayDataset("bad", x, y, x, y, 2, (0.0,), (1.0,))


def test_resolve_data_dir_prefers_argument_then_env_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARPNESS_DATA_DIR", str(tmp_path / "from_env"))
    assert resolve_data_dir(tmp_path / "given") == tmp_path / "given"
    assert resolve_data_dir(str(tmp_path / "given")) == tmp_path / "given"
    assert resolve_data_dir(None) == tmp_path / "from_env"
    monkeypatch.delenv("SHARPNESS_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "sharpness" / "data"
    assert resolve_data_dir("~/elsewhere") == tmp_path / "home" / "elsewhere"
    monkeypatch.setenv("SHARPNESS_DATA_DIR", "")
    assert resolve_data_dir(None) == Path(tmp_path / "home" / ".cache" / "sharpness" / "data")
