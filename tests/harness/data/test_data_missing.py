"""What load_dataset says when a data set is absent, and where it looks."""

import numpy as np
import pytest

from sharpness.harness.data import find_dataset, load_dataset


def test_missing_cifar10_message_names_files_folders_and_remedies(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        load_dataset("cifar10", tmp_path)
    message = str(caught.value)
    for expected in (
        f"data set 'cifar10' not found under {tmp_path}",
        "cifar10.npz",
        "cifar10.part0.npz",
        "cifar-10-batches-py/ holding data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch",
        "cifar-10-python.tar.gz",
        f"in {tmp_path}, {tmp_path / 'cifar10'}, {tmp_path / 'cifar-10'}",
        "--data-dir DIR",
        "SHARPNESS_DATA_DIR",
        "`sharpness download cifar10`",
        "--download on train, compare and select-rho",
    ):
        assert expected in message
    assert "download=True" not in message  # no such config key


def test_missing_mnist_message_lists_idx_files_and_torchvision_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        load_dataset("mnist", tmp_path)
    message = str(caught.value)
    idx_line = (
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        f"t10k-labels-idx1-ubyte[.gz]  in {tmp_path / 'mnist'}, {tmp_path / 'MNIST' / 'raw'}"
    )
    assert idx_line in message


def test_missing_svhn_and_cifar100_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_32x32\.mat, test_32x32\.mat"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/ holding train, test"):
        load_dataset("cifar100", tmp_path)


def test_environment_variable_is_used_without_argument(tmp_path, monkeypatch):
    x = np.zeros((1, 28, 28), np.uint8)
    np.savez(tmp_path / "fashion_mnist.npz", x_train=x, y_train=[3], x_test=x, y_test=[4])
    monkeypatch.setenv("SHARPNESS_DATA_DIR", str(tmp_path))
    assert load_dataset("Fashion-MNIST").y_train.tolist() == [3]


def test_unknown_data_set_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'stl10'"):
        load_dataset("stl10", tmp_path)


def test_find_dataset_reports_the_copy_that_would_be_read(tmp_path):
    assert find_dataset("cifar10", tmp_path) is None
    assert find_dataset("digits", tmp_path) == "embedded (scikit-learn load_digits)"
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.part1.npz").write_bytes(b"")
    (tmp_path / "mnist" / "mnist.part0.npz").write_bytes(b"")
    assert (
        find_dataset("mnist", tmp_path)
        == f"{tmp_path / 'mnist' / 'mnist.part0.npz'}, {tmp_path / 'mnist' / 'mnist.part1.npz'}"
    )
    (tmp_path / "mnist.npz").write_bytes(b"")
    assert find_dataset("MNIST", tmp_path) == str(tmp_path / "mnist.npz")
