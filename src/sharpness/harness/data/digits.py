"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits, needing no files."""

from __future__ import annotations

import numpy as np

from sharpness.harness.data.checks import Split, TrainTest

DIGITS_TEST_SIZE = 500
DIGITS_SPLIT_SEED = 0


def read_digits() -> TrainTest:
    """1797 images scaled from 0..16 to uint8 as ``round(v * 255 / 16)``, shape ``(N, 8, 8, 1)``.

    Split once, stratified by class, into 1297 training and 500 test images with a fixed seed; each
    split keeps the original order of the bundled file.
    """
    # Imported here: scikit-learn takes about a second to import and only this data set needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[..., np.newaxis]
    labels = bunch.target.astype(np.int64)
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    train_index, test_index = np.sort(train_index), np.sort(test_index)
    return TrainTest(
        Split(images[train_index], labels[train_index]),
        Split(images[test_index], labels[test_index]),
    )
