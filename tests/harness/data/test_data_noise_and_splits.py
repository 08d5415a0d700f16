"""Label noise and the seeded train/validation split."""

import numpy as np
import pytest

from sharpness.harness.data import noisy_labels, train_val_split


def test_symmetric_noise_changes_exact_count_to_other_classes():
    labels = np.arange(1000) % 10
    original = labels.copy()
    noisy = noisy_labels(labels, 10, 0.4, seed=0)
    changed = noisy != labels
    assert noisy.dtype == np.int64 and noisy.shape == (1000,)
    assert int(changed.sum()) == 400
    np.testing.assert_array_equal(labels, original)
    assert noisy.min() >= 0 and noisy.max() <= 9


def test_symmetric_noise_is_reproducible_and_seed_dependent():
    labels = np.arange(500) % 7
    np.testing.assert_array_equal(noisy_labels(labels, 7, 0.3, seed=5), noisy_labels(labels, 7, 0.3, seed=5))
    assert not np.array_equal(noisy_labels(labels, 7, 0.3, seed=5), noisy_labels(labels, 7, 0.3, seed=6))


def test_symmetric_noise_is_uniform_over_other_classes_and_positions():
    labels = np.full(20000, 3)
    noisy = noisy_labels(labels, 5, 1.0, seed=1)
    counts = np.bincount(noisy, minlength=5)
    assert counts[3] == 0
    assert all(abs(int(counts[c]) - 5000) < 300 for c in (0, 1, 2, 4))
    half = noisy_labels(np.zeros(20000, np.int64), 5, 0.5, seed=2) != 0
    assert int(half.sum()) == 10000
    assert abs(int(half[:10000].sum()) - 5000) < 300


def test_count_uses_round_of_fraction_times_n():
    assert int((noisy_labels(np.zeros(7, np.int64), 3, 0.5, seed=0) != 0).sum()) == 4
    assert int((noisy_labels(np.zeros(5, np.int64), 3, 0.5, seed=0) != 0).sum()) == 2
    np.testing.assert_array_equal(noisy_labels(np.arange(6) % 3, 3, 0.0, seed=0), np.arange(6) % 3)


def test_asymmetric_noise_moves_to_next_class():
    labels = np.arange(100) % 10
    noisy = noisy_labels(labels, 10, 0.25, seed=3, kind="asymmetric")
    changed = noisy != labels
    assert int(changed.sum()) == 25
    np.testing.assert_array_equal(noisy[changed], (labels[changed] + 1) % 10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros(3, np.int64), 10, 1.5, 0), r"fraction must lie in \[0, 1\]"),
        ((np.zeros(3, np.int64), 1, 0.5, 0), "at least 2 classes"),
        ((np.array([0, 10]), 10, 0.5, 0), r"labels must lie in \[0, 9\]"),
        ((np.zeros(3), 10, 0.5, 0), "1-D integer array"),
    ],
)
def test_noise_argument_errors(args, message):
    with pytest.raises(ValueError, match=message):
        noisy_labels(*args)


def test_unknown_noise_kind():
    with pytest.raises(ValueError, match="unknown noise kind 'pairflip'"):
        noisy_labels(np.zeros(3, np.int64), 10, 0.5, 0, kind="pairflip")


def test_train_val_split_is_disjoint_covering_and_seeded():
    train, val = train_val_split(1000, 0.1, seed=0)
    assert len(train) == 900 and len(val) == 100
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again_train, again_val = train_val_split(1000, 0.1, seed=0)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(val, train_val_split(1000, 0.1, seed=1)[1])
    assert val.max() > 500 and val.min() < 500


def test_train_val_split_edges_and_errors():
    train, val = train_val_split(10, 0.0, seed=0)
    assert train.tolist() == list(range(10)) and val.size == 0
    with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 1\]"):
        train_val_split(10, -0.1, seed=0)
    with pytest.raises(ValueError, match="num must be non-negative"):
        train_val_split(-1, 0.1, seed=0)
