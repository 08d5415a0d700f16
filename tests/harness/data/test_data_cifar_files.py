"""Reading CIFAR-10/100 python pickles from folders and straight from .tar.gz archives."""

import io
import pickle
import tarfile

import numpy as np
import pytest

from sharpness.harness.data import load_dataset

CIFAR10_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _rows(images):
    """Official layout: one row per image, 1024 red then 1024 green then 1024 blue bytes."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def _batch_bytes(images, labels, label_key=b"labels", protocol=2, extra=None):
    batch = {b"batch_label": b"batch", label_key: [int(v) for v in labels], b"data": _rows(images)}
    batch[b"filenames"] = [b"img_%d.png" % i for i in range(len(labels))]
    batch.update(extra or {})
    return pickle.dumps(batch, protocol=protocol)


def _cifar10_batches(per_batch=3, protocol=2):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6 * per_batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=6 * per_batch)
    files = {}
    for i, name in enumerate(CIFAR10_NAMES):
        part = slice(i * per_batch, (i + 1) * per_batch)
        files[name] = _batch_bytes(images[part], labels[part], protocol=protocol)
    return images, labels, files


def _write_folder(folder, files):
    folder.mkdir(parents=True)
    for name, payload in files.items():
        (folder / name).write_bytes(payload)


def _write_tar(path, folder_name, files):
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{folder_name}/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_folder_rows_become_hwc_images(tmp_path, protocol):
    images, labels, files = _cifar10_batches(protocol=protocol)
    _write_folder(tmp_path / "cifar-10-batches-py", files)
    data = load_dataset("cifar10", tmp_path)
    assert data.x_train.shape == (15, 32, 32, 3) and data.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(data.x_train, images[:15])
    np.testing.assert_array_equal(data.x_test, images[15:])
    assert data.y_train.tolist() == labels[:15].tolist() and data.y_test.tolist() == labels[15:].tolist()
    row = _rows(images[:1])[0]
    for channel in range(3):
        assert data.x_train[0, 1, 2, channel] == row[channel * 1024 + 1 * 32 + 2]


def test_cifar10_folder_under_named_subfolder(tmp_path):
    images, _, files = _cifar10_batches(per_batch=1)
    _write_folder(tmp_path / "cifar10" / "cifar-10-batches-py", files)
    np.testing.assert_array_equal(load_dataset("cifar10", tmp_path).x_test, images[5:])


def test_cifar10_tar_gz_read_without_extracting(tmp_path):
    images, labels, files = _cifar10_batches()
    _write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    data = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(data.x_train, images[:15])
    np.testing.assert_array_equal(data.x_test, images[15:])
    assert data.y_test.tolist() == labels[15:].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


def _cifar100_files():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    fine = np.array([0, 99, 42, 7, 63])
    coarse = {b"coarse_labels": [19, 18, 17, 16, 15]}
    files = {
        "train": _batch_bytes(images[:3], fine[:3], label_key=b"fine_labels", extra=coarse),
        "test": _batch_bytes(images[3:], fine[3:], label_key=b"fine_labels", extra=coarse),
    }
    return images, fine, files


def test_cifar100_folder_uses_fine_labels(tmp_path):
    images, fine, files = _cifar100_files()
    _write_folder(tmp_path / "cifar-100-python", files)
    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100
    assert data.y_train.tolist() == [0, 99, 42] and data.y_test.tolist() == [7, 63]
    np.testing.assert_array_equal(data.x_train, images[:3])
    np.testing.assert_array_equal(data.x_test, images[3:])


def test_cifar100_tar_gz(tmp_path):
    images, _, files = _cifar100_files()
    _write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", files)
    data = load_dataset("cifar100", tmp_path)
    np.testing.assert_array_equal(data.x_test, images[3:])
    assert data.y_test.tolist() == [7, 63]


def test_truncated_pickle_names_the_file(tmp_path):
    _, _, files = _cifar10_batches()
    files["data_batch_3"] = files["data_batch_3"][:1000]
    _write_folder(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(ValueError, match=r"data_batch_3: truncated or corrupt CIFAR pickle"):
        load_dataset("cifar10", tmp_path)


def test_wrong_row_size_names_the_file_and_expectation(tmp_path):
    _, _, files = _cifar10_batches()
    short_rows = {b"labels": [1, 2, 3], b"data": np.zeros((3, 3000), np.uint8)}
    files["test_batch"] = pickle.dumps(short_rows, protocol=2)
    _write_folder(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(
        ValueError,
        match=r"test_batch: expected 3 images of 3072 bytes .* got uint8 array of shape \(3, 3000\)",
    ):
        load_dataset("cifar10", tmp_path)


def test_missing_label_key_is_reported(tmp_path):
    _, _, files = _cifar10_batches()
    files["data_batch_1"] = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}, protocol=2)
    _write_folder(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(ValueError, match=r"data_batch_1: expected keys b'data' and b'labels', found b'data'"):
        load_dataset("cifar10", tmp_path)


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    _, _, files = _cifar10_batches()
    files["data_batch_1"] = pickle.dumps({b"data": print, b"labels": []}, protocol=4)
    _write_folder(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(ValueError, match=r"data_batch_1: .*refusing to load global builtins\.print"):
        load_dataset("cifar10", tmp_path)


def test_truncated_tar_gz_names_the_file(tmp_path):
    _, _, files = _cifar10_batches()
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_tar(path, "cifar-10-batches-py", files)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz: truncated or corrupt tar\.gz archive"):
        load_dataset("cifar10", tmp_path)


def test_tar_gz_lacking_a_batch_is_reported(tmp_path):
    _, _, files = _cifar10_batches()
    del files["data_batch_4"]
    _write_tar(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", files)
    with pytest.raises(ValueError, match=r"archive lacks cifar-10-batches-py/data_batch_4"):
        load_dataset("cifar10", tmp_path)


def test_incomplete_folder_is_listed_when_nothing_else_is_found(tmp_path):
    _, _, files = _cifar10_batches()
    del files["test_batch"]
    _write_folder(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py lacks test_batch"):
        load_dataset("cifar10", tmp_path)
