"""Image-classification data for the paper's experiments, as uint8 numpy arrays.

CIFAR-10, CIFAR-100 (fine labels), SVHN, MNIST and Fashion-MNIST are read from ``.npz`` archives (whole
or in numbered parts) or from the official release files; ``digits`` is embedded and needs no files.
Also: label noise (:func:`noisy_labels`) and a seeded hold-out split (:func:`train_val_split`).
"""

from sharpness.harness.data.catalog import DATASETS
from sharpness.harness.data.dataset import ArrayDataset, channel_stats
from sharpness.harness.data.download import download_dataset
from sharpness.harness.data.loading import find_dataset, load_dataset
from sharpness.harness.data.locations import DATA_DIR_ENV, default_data_dir, resolve_data_dir
from sharpness.harness.data.noise import NOISE_KINDS, noisy_labels
from sharpness.harness.data.splits import train_val_split

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "NOISE_KINDS",
    "ArrayDataset",
    "channel_stats",
    "default_data_dir",
    "download_dataset",
    "find_dataset",
    "load_dataset",
    "noisy_labels",
    "resolve_data_dir",
    "train_val_split",
]
