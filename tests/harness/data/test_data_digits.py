"""The embedded digits data set."""

import numpy as np
from sklearn.datasets import load_digits

from sharpness.harness.data import load_dataset


def test_digits_shapes_types_and_split_sizes(tmp_path):
    data = load_dataset("digits", tmp_path / "not-needed")
    assert data.name == "digits" and data.num_classes == 10
    assert data.x_train.shape == (1297, 8, 8, 1) and data.x_test.shape == (500, 8, 8, 1)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    assert np.bincount(data.y_test).tolist() == [50, 51, 49, 51, 50, 51, 50, 50, 48, 50]
    assert np.bincount(data.y_train).tolist() == [128, 131, 128, 132, 131, 131, 131, 129, 126, 130]


def test_digits_pixels_are_scaled_bundled_images():
    data = load_dataset("digits")
    bunch = load_digits()
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(data.x_train).tolist()) <= allowed and int(data.x_train.max()) == 255

    def keyed(images, labels):
        return sorted(image.tobytes() + bytes([label]) for image, label in zip(images, labels, strict=True))

    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    loaded = np.concatenate([data.x_train, data.x_test])[..., 0]
    labels = np.concatenate([data.y_train, data.y_test])
    assert keyed(loaded, labels) == keyed(expected, bunch.target)


def test_digits_are_identical_every_call_and_stats_match():
    first, second = load_dataset("digits"), load_dataset("digits")
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    scaled = first.x_train / 255.0
    np.testing.assert_allclose(first.mean, [scaled.mean()], rtol=0, atol=1e-13)
    np.testing.assert_allclose(first.std, [scaled.std()], rtol=0, atol=1e-13)
