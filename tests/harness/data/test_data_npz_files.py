"""Reading <name>.npz archives and <name>.part<i>.npz part files."""

import numpy as np
import pytest

from sharpness.harness.data import load_dataset


def _images(count, shape, start=0):
    return ((np.arange(count * int(np.prod(shape))).reshape(count, *shape) + start) % 256).astype(np.uint8)


def test_single_npz_with_grey_images_gains_channel_axis(tmp_path):
    x_train, x_test = _images(4, (28, 28)), _images(2, (28, 28), start=7)
    y_train, y_test = np.array([0, 9, 3, 3], np.uint8), np.array([5, 1], np.uint8)
    np.savez_compressed(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    data = load_dataset("mnist", tmp_path)
    assert data.name == "mnist" and data.num_classes == 10
    assert data.x_train.shape == (4, 28, 28, 1) and data.x_train.dtype == np.uint8
    np.testing.assert_array_equal(data.x_train[..., 0], x_train)
    np.testing.assert_array_equal(data.x_test[..., 0], x_test)
    assert data.y_train.dtype == np.int64 and data.y_train.tolist() == [0, 9, 3, 3]
    assert data.y_test.tolist() == [5, 1]
    assert data.mean == pytest.approx((x_train.mean() / 255,), abs=1e-12)
    assert data.std == pytest.approx((x_train.std() / 255,), abs=1e-12)


def test_npz_in_named_subfolder_with_colour_images(tmp_path):
    (tmp_path / "svhn").mkdir()
    x = _images(3, (32, 32, 3))
    np.savez(tmp_path / "svhn" / "svhn.npz", x_train=x, y_train=np.array([0, 1, 2]), x_test=x[:1], y_test=[9])
    data = load_dataset("svhn", tmp_path)
    np.testing.assert_array_equal(data.x_train, x)
    assert data.y_test.tolist() == [9]


def _write_parts(folder, num_train_parts, with_indices=True):
    for i in range(num_train_parts):
        arrays = {"x_train": np.full((1, 32, 32, 3), i, np.uint8), "y_train": np.array([i % 10], np.uint8)}
        if with_indices:
            arrays |= {"train_index_start": np.array(i), "train_index_stop": np.array(i + 1)}
        np.savez_compressed(folder / f"cifar10.part{i}.npz", **arrays)
    test = {"x_test": np.full((2, 32, 32, 3), 200, np.uint8), "y_test": np.array([3, 4], np.uint8)}
    np.savez_compressed(folder / f"cifar10.part{num_train_parts}.npz", **test)


def test_parts_concatenate_in_numeric_order(tmp_path):
    _write_parts(tmp_path, 11)
    data = load_dataset("cifar10", tmp_path)
    assert data.x_train.shape == (11, 32, 32, 3)
    assert data.x_train[:, 0, 0, 0].tolist() == list(range(11))
    assert data.y_train.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert data.x_test.shape == (2, 32, 32, 3) and int(data.x_test.min()) == 200
    assert data.y_test.tolist() == [3, 4]


def test_whole_npz_is_preferred_over_parts(tmp_path):
    _write_parts(tmp_path, 2)
    x = np.full((1, 32, 32, 3), 77, np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=[1], x_test=x, y_test=[2])
    assert load_dataset("cifar10", tmp_path).x_train.tolist() == x.tolist()


def test_part_gap_is_reported(tmp_path):
    _write_parts(tmp_path, 3)
    (tmp_path / "cifar10.part1.npz").unlink()
    with pytest.raises(ValueError, match=r"cifar10\.part2\.npz: expected part 1 here"):
        load_dataset("cifar10", tmp_path)


def test_part_with_wrong_train_index_is_reported(tmp_path):
    _write_parts(tmp_path, 2)
    np.savez(
        tmp_path / "cifar10.part1.npz",
        x_train=np.zeros((1, 32, 32, 3), np.uint8),
        y_train=[0],
        train_index_start=5,
        train_index_stop=6,
    )
    with pytest.raises(ValueError, match=r"part1\.npz: declares training images 5:6, but in part order they are 1:2"):
        load_dataset("cifar10", tmp_path)


def test_parts_without_test_split_are_reported(tmp_path):
    _write_parts(tmp_path, 2)
    (tmp_path / "cifar10.part2.npz").unlink()
    with pytest.raises(ValueError, match="no part holds x_test/y_test"):
        load_dataset("cifar10", tmp_path)


def test_part_missing_labels_is_reported(tmp_path):
    np.savez(tmp_path / "cifar10.part0.npz", x_train=np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"part0\.npz: expected both x_train and y_train"):
        load_dataset("cifar10", tmp_path)


def test_missing_keys_are_named(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((1, 28, 28), np.uint8), y_train=[0])
    with pytest.raises(ValueError, match=r"mnist\.npz: missing keys x_test, y_test; expected x_train, y_train"):
        load_dataset("mnist", tmp_path)


def test_truncated_npz_is_reported(tmp_path):
    x = _images(20, (28, 28))
    path = tmp_path / "mnist.npz"
    np.savez_compressed(path, x_train=x, y_train=np.zeros(20, np.uint8), x_test=x, y_test=np.zeros(20, np.uint8))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"mnist\.npz: not a readable \.npz archive"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    ("x_train", "y_train", "message"),
    [
        (
            np.zeros((2, 28, 28, 3), np.uint8),
            [0, 1],
            r"expected images of shape \(N, 32, 32, 3\), got \(2, 28, 28, 3\)",
        ),
        (np.zeros((2, 32, 32, 3), np.float32), [0, 1], "expected uint8 images, got dtype float32"),
        (np.zeros((2, 32, 32, 3), np.uint8), [0], "expected 2 labels"),
        (
            np.zeros((2, 32, 32, 3), np.uint8),
            [0, 10],
            r"expected labels in \[0, 9\], got values in \[0, 10\]",
        ),
    ],
)
def test_wrong_arrays_are_reported_with_file_name(tmp_path, x_train, y_train, message):
    ok = np.zeros((1, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x_train, y_train=y_train, x_test=ok, y_test=[0])
    with pytest.raises(ValueError, match=rf"cifar10\.npz: {message}"):
        load_dataset("cifar10", tmp_path)
