"""Reading SVHN train_32x32.mat / test_32x32.mat, and extra_32x32.mat for svhn_extra."""

import numpy as np
import pytest
import scipy.io

from sharpness.harness.data import load_dataset


def _write(folder, count, labels, shape=(32, 32, 3), seed=4):
    images = np.random.default_rng(seed).integers(0, 256, size=(*shape, count), dtype=np.uint8)
    scipy.io.savemat(folder, {"X": images, "y": np.asarray(labels, np.uint8).reshape(-1, 1)})
    return images


def test_svhn_mat_files(tmp_path):
    (tmp_path / "svhn").mkdir()
    train = _write(tmp_path / "svhn" / "train_32x32.mat", 4, [10, 1, 5, 10])
    test = _write(tmp_path / "svhn" / "test_32x32.mat", 2, [3, 10], seed=5)
    data = load_dataset("svhn", tmp_path)
    assert data.x_train.shape == (4, 32, 32, 3) and data.x_test.shape == (2, 32, 32, 3)
    for i in range(4):
        np.testing.assert_array_equal(data.x_train[i], train[..., i])
    np.testing.assert_array_equal(data.x_test[1], test[..., 1])
    assert data.x_train[2, 5, 7, 1] == train[5, 7, 1, 2]
    assert data.y_train.tolist() == [0, 1, 5, 0] and data.y_test.tolist() == [3, 0]


def test_svhn_in_data_folder_itself(tmp_path):
    _write(tmp_path / "train_32x32.mat", 1, [2])
    _write(tmp_path / "test_32x32.mat", 1, [4])
    assert load_dataset("svhn", tmp_path).y_test.tolist() == [4]


def test_svhn_wrong_image_shape_is_reported(tmp_path):
    _write(tmp_path / "train_32x32.mat", 2, [1, 2], shape=(28, 28, 3))
    _write(tmp_path / "test_32x32.mat", 1, [4])
    with pytest.raises(
        ValueError, match=r"train_32x32\.mat: expected X of shape \(32, 32, 3, N\), got \(28, 28, 3, 2\)"
    ):
        load_dataset("svhn", tmp_path)


def test_svhn_bad_labels_are_reported(tmp_path):
    _write(tmp_path / "train_32x32.mat", 2, [1, 11])
    _write(tmp_path / "test_32x32.mat", 1, [4])
    with pytest.raises(ValueError, match=r"train_32x32\.mat: expected labels y in 1\.\.10"):
        load_dataset("svhn", tmp_path)


def test_svhn_corrupt_file_is_reported(tmp_path):
    _write(tmp_path / "train_32x32.mat", 2, [1, 2])
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(50))
    with pytest.raises(ValueError, match=r"test_32x32\.mat: truncated or corrupt MATLAB file"):
        load_dataset("svhn", tmp_path)


def test_svhn_without_test_file_is_listed(tmp_path):
    _write(tmp_path / "train_32x32.mat", 2, [1, 2])
    with pytest.raises(FileNotFoundError, match=r"lacks test_32x32\.mat"):
        load_dataset("svhn", tmp_path)


def test_svhn_truncated_file_is_reported(tmp_path):
    _write(tmp_path / "train_32x32.mat", 4, [1, 2, 3, 4])
    _write(tmp_path / "test_32x32.mat", 1, [4])
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"train_32x32\.mat: truncated or corrupt MATLAB file"):
        load_dataset("svhn", tmp_path)


def test_svhn_extra_trains_on_train_then_extra(tmp_path):
    (tmp_path / "svhn").mkdir()
    train = _write(tmp_path / "svhn" / "train_32x32.mat", 3, [10, 1, 5])
    extra = _write(tmp_path / "svhn" / "extra_32x32.mat", 2, [7, 10], seed=6)
    test = _write(tmp_path / "svhn" / "test_32x32.mat", 2, [3, 10], seed=5)
    data = load_dataset("svhn-extra", tmp_path)
    assert data.name == "svhn_extra" and data.x_train.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(data.x_train, np.moveaxis(np.concatenate([train, extra], axis=-1), -1, 0))
    np.testing.assert_array_equal(data.x_test, np.moveaxis(test, -1, 0))
    assert data.y_train.tolist() == [0, 1, 5, 7, 0] and data.y_test.tolist() == [3, 0]
    assert load_dataset("svhn", tmp_path).y_train.tolist() == [0, 1, 5]  # plain svhn ignores the extra file
    expected_mean = np.concatenate([train, extra], axis=-1).reshape(-1, 3, 5).transpose(0, 2, 1).reshape(-1, 3)
    np.testing.assert_allclose(data.mean, expected_mean.mean(axis=0) / 255, rtol=1e-12)


def test_svhn_extra_without_extra_file_is_listed(tmp_path):
    _write(tmp_path / "train_32x32.mat", 2, [1, 2])
    _write(tmp_path / "test_32x32.mat", 1, [4])
    with pytest.raises(FileNotFoundError) as caught:
        load_dataset("svhn_extra", tmp_path)
    message = str(caught.value)
    assert "train_32x32.mat, extra_32x32.mat, test_32x32.mat" in message
    assert f"{tmp_path} lacks extra_32x32.mat" in message
    assert "sharpness download svhn_extra" in message


def test_svhn_extra_corrupt_extra_file_is_reported(tmp_path):
    _write(tmp_path / "train_32x32.mat", 2, [1, 2])
    _write(tmp_path / "extra_32x32.mat", 2, [1, 12])
    _write(tmp_path / "test_32x32.mat", 1, [4])
    with pytest.raises(ValueError, match=r"extra_32x32\.mat: expected labels y in 1\.\.10"):
        load_dataset("svhn_extra", tmp_path)
