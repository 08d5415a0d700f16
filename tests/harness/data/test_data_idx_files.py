"""Reading MNIST / Fashion-MNIST idx files, gzip-compressed or raw."""

import gzip
import struct

import numpy as np
import pytest

from sharpness.harness.data import load_dataset

STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_images(images, magic=2051):
    count, rows, cols = images.shape
    return struct.pack(">IIII", magic, count, rows, cols) + images.tobytes()


def _idx_labels(labels, magic=2049):
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def _arrays():
    rng = np.random.default_rng(3)
    return {
        "train_images": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "train_labels": np.array([5, 0, 4, 1, 9], np.uint8),
        "test_images": rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8),
        "test_labels": np.array([7, 2], np.uint8),
    }


def _write(folder, arrays, compress=True, dotted=False, contents=None):
    folder.mkdir(parents=True, exist_ok=True)
    contents = contents or {}
    for key, stem in STEMS.items():
        payload = contents.get(key)
        if payload is None:
            payload = _idx_images(arrays[key]) if key.endswith("images") else _idx_labels(arrays[key])
        name = stem.replace("-idx", ".idx") if dotted else stem
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)


def _check(data, arrays):
    assert data.x_train.shape == (5, 28, 28, 1) and data.x_test.shape == (2, 28, 28, 1)
    np.testing.assert_array_equal(data.x_train[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(data.x_test[..., 0], arrays["test_images"])
    assert data.y_train.tolist() == [5, 0, 4, 1, 9] and data.y_test.tolist() == [7, 2]
    assert data.x_train.flags.writeable


@pytest.mark.parametrize(
    ("name", "subfolder", "compress", "dotted"),
    [
        ("mnist", "mnist", True, False),
        ("mnist", "MNIST/raw", False, False),
        ("mnist", "mnist", True, True),
        ("fashion_mnist", "fashion_mnist", True, False),
        ("fashion_mnist", "FashionMNIST/raw", False, False),
    ],
)
def test_idx_layouts(tmp_path, name, subfolder, compress, dotted):
    arrays = _arrays()
    _write(tmp_path / subfolder, arrays, compress=compress, dotted=dotted)
    data = load_dataset(name, tmp_path)
    assert data.name == name
    _check(data, arrays)


def test_mnist_files_do_not_count_as_fashion_mnist(tmp_path):
    _write(tmp_path / "mnist", _arrays())
    with pytest.raises(FileNotFoundError):
        load_dataset("fashion_mnist", tmp_path)


def test_idx_files_in_the_data_folder_itself_are_not_used(tmp_path):
    _write(tmp_path, _arrays())
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist", tmp_path)


def test_wrong_image_magic_is_reported(tmp_path):
    arrays = _arrays()
    _write(tmp_path / "mnist", arrays, contents={"train_images": _idx_images(arrays["train_images"], 2049)})
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte\.gz: expected idx3 image magic number 2051, got 2049"
    ):
        load_dataset("mnist", tmp_path)


def test_wrong_label_magic_is_reported(tmp_path):
    arrays = _arrays()
    _write(
        tmp_path / "mnist",
        arrays,
        compress=False,
        contents={"test_labels": _idx_labels(arrays["test_labels"], 7)},
    )
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: expected idx1 label magic number 2049, got 7"):
        load_dataset("mnist", tmp_path)


def test_short_image_file_is_reported(tmp_path):
    arrays = _arrays()
    short = _idx_images(arrays["test_images"])[:-10]
    _write(tmp_path / "mnist", arrays, compress=False, contents={"test_images": short})
    with pytest.raises(
        ValueError,
        match=r"t10k-images-idx3-ubyte: expected 2 images of 28x28 bytes "
        r"\(1568 bytes after the header\), got 1558",
    ):
        load_dataset("mnist", tmp_path)


def test_short_label_file_is_reported(tmp_path):
    arrays = _arrays()
    _write(
        tmp_path / "mnist",
        arrays,
        compress=False,
        contents={"train_labels": _idx_labels(arrays["train_labels"])[:-1]},
    )
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: expected 5 labels of 1 byte .*got 4 bytes"):
        load_dataset("mnist", tmp_path)


def test_truncated_gzip_is_reported(tmp_path):
    arrays = _arrays()
    _write(tmp_path / "mnist", arrays)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt gzip data"):
        load_dataset("mnist", tmp_path)


def test_image_and_label_counts_must_agree(tmp_path):
    arrays = _arrays()
    _write(tmp_path / "mnist", arrays, contents={"test_labels": _idx_labels(np.array([1, 2, 3]))})
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: expected 2 labels to match .*, got 3"):
        load_dataset("mnist", tmp_path)


def test_wrong_image_size_is_reported(tmp_path):
    arrays = _arrays()
    small = np.zeros((2, 27, 28), np.uint8)
    _write(tmp_path / "mnist", arrays, contents={"test_images": _idx_images(small)})
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 28, 28, 1\), got \(2, 27, 28, 1\)"):
        load_dataset("mnist", tmp_path)


def test_incomplete_idx_folder_is_listed(tmp_path):
    _write(tmp_path / "mnist", _arrays())
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"mnist lacks t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("mnist", tmp_path)
