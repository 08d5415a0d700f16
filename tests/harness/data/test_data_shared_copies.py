"""The verified copies in shared/data beside the repository (skipped where that folder is absent)."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from sharpness.harness.data import load_dataset

_ROOT = Path(__file__).resolve().parents[3]
_CANDIDATES = (_ROOT / ".." / "shared" / "data", _ROOT / "shared" / "data")
SHARED_DATA = next((path.resolve() for path in _CANDIDATES if (path / "README.md").is_file()), None)


def _sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def shared_data():
    if SHARED_DATA is None:
        pytest.skip("shared/data is not present beside the repository")
    return SHARED_DATA


def test_fashion_mnist_copy(shared_data):
    data = load_dataset("fashion_mnist", shared_data)
    assert data.x_train.shape == (60000, 28, 28, 1) and data.x_test.shape == (10000, 28, 28, 1)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert _sha256(data.x_train) == "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012"
    assert _sha256(data.y_test.astype(np.uint8)) == "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9"


def test_cifar10_parts(shared_data):
    data = load_dataset("cifar10", shared_data)
    assert data.x_train.shape == (50000, 32, 32, 3) and data.x_test.shape == (10000, 32, 32, 3)
    assert data.x_train.dtype == np.uint8 and data.y_test.dtype == np.int64
    assert np.bincount(data.y_train).tolist() == [5000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert _sha256(data.x_test) == "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04"
    assert _sha256(data.x_train) == "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a"
    assert _sha256(data.y_train.astype(np.uint8)) == "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253"
    assert data.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=5e-5)
    assert data.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=5e-5)
