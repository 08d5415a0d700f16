"""prepare_data: subset, seeded hold-out, label noise on the training labels only; the test set stays clean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sharpness.harness.config import load_config
from sharpness.harness.prepare import prepare_data

N_TRAIN, N_TEST = 600, 100


def _indexed_mnist(folder: Path) -> Path:
    """An MNIST-shaped npz whose image i holds i in its first two pixels, so any split can be traced back."""

    def images(n: int, offset: int) -> np.ndarray:
        x = np.zeros((n, 28, 28), np.uint8)
        index = np.arange(n) + offset
        x[:, 0, 0], x[:, 0, 1] = index % 256, index // 256
        return x

    np.savez(
        folder / "mnist.npz",
        x_train=images(N_TRAIN, 0),
        y_train=np.arange(N_TRAIN) % 10,
        x_test=images(N_TEST, 10_000),
        y_test=(np.arange(N_TEST) * 3) % 10,
    )
    return folder


def _index(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 1, 0].astype(np.int64)


def _config(folder: Path, *overrides: str):
    return load_config("demo-digits", ["dataset=mnist", f"data_dir={folder}", *overrides])


def test_validation_split_is_disjoint_covering_and_seeded(tmp_path):
    folder = _indexed_mnist(tmp_path)
    data = prepare_data(_config(folder, "train_subset=500", "val_fraction=0.1", "eval_on=val", "seed=3"))
    train, val = _index(data.train_images), _index(data.val_images)
    assert len(val) == 50 and len(train) == 450
    assert set(train).isdisjoint(val) and sorted({*train, *val}) == list(range(500))  # the subset's first 500
    np.testing.assert_array_equal(data.clean_train_labels, train % 10)
    np.testing.assert_array_equal(data.val_labels, val % 10)
    again = prepare_data(_config(folder, "train_subset=500", "val_fraction=0.1", "eval_on=val", "seed=3"))
    np.testing.assert_array_equal(_index(again.val_images), val)
    other = prepare_data(_config(folder, "train_subset=500", "val_fraction=0.1", "eval_on=val", "seed=4"))
    assert not np.array_equal(_index(other.val_images), val)
    assert list(data.splits) == ["val", "test"] and data.eval_split == "val"


def test_label_noise_touches_training_labels_only(tmp_path):
    folder = _indexed_mnist(tmp_path)
    data = prepare_data(_config(folder, "label_noise=0.4", "val_fraction=0.2"))
    test = _index(data.test_images)
    np.testing.assert_array_equal(test, np.arange(N_TEST) + 10_000)
    np.testing.assert_array_equal(data.test_labels, (np.arange(N_TEST) * 3) % 10)  # clean
    np.testing.assert_array_equal(data.val_labels, _index(data.val_images) % 10)  # clean
    np.testing.assert_array_equal(data.clean_train_labels, _index(data.train_images) % 10)
    changed = data.train_labels != data.clean_train_labels
    assert int(changed.sum()) == round(0.4 * len(changed)) == 192
    np.testing.assert_array_equal(data.noisy_train_labels, data.train_labels)
    assert list(data.splits) == ["test"] and data.eval_split == "test"  # eval_on: test evaluates the test set


def test_bootstrap_labels_replace_the_trained_labels_but_keep_the_noisy_ones(tmp_path):
    folder = _indexed_mnist(tmp_path)
    config = _config(folder, "label_noise=0.4", "bootstrap=true")
    noisy = prepare_data(config).train_labels
    predicted = np.full(N_TRAIN, 7)
    data = prepare_data(config, predicted)
    np.testing.assert_array_equal(data.train_labels, predicted)
    np.testing.assert_array_equal(data.noisy_train_labels, noisy)
    with pytest.raises(ValueError, match="5 replacement training labels for 600 training images"):
        prepare_data(config, predicted[:5])


def test_a_hold_out_that_leaves_a_split_empty_is_refused(tmp_path):
    folder = _indexed_mnist(tmp_path)
    with pytest.raises(ValueError, match="of 10 training images leaves 10 to train on and 0 to validate on"):
        prepare_data(_config(folder, "train_subset=10", "val_fraction=0.01"))
