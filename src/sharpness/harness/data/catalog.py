"""What each supported data set is: classes, image shape, folders searched and official files."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name, md5 (as torchvision checks it) and the sub-folder it is stored in."""

    filename: str
    md5: str
    subdir: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a data set."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    subdirs: tuple[str, ...]
    mirrors: tuple[str, ...] = ()
    remote: tuple[RemoteFile, ...] = ()


_SVHN_MIRRORS = ("http://ufldl.stanford.edu/housenumbers/",)
_SVHN_TRAIN = RemoteFile("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", "svhn")
_SVHN_EXTRA = RemoteFile("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7", "svhn")
_SVHN_TEST = RemoteFile("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", "svhn")

SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="cifar10",
            num_classes=10,
            image_shape=(32, 32, 3),
            subdirs=("cifar10", "cifar-10"),
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            remote=(RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        ),
        DatasetSpec(
            name="cifar100",
            num_classes=100,
            image_shape=(32, 32, 3),
            subdirs=("cifar100", "cifar-100"),
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            remote=(RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        ),
        DatasetSpec(
            name="svhn",
            num_classes=10,
            image_shape=(32, 32, 3),
            subdirs=("svhn", "SVHN"),
            mirrors=_SVHN_MIRRORS,
            remote=(_SVHN_TRAIN, _SVHN_TEST),
        ),
        # SVHN's training set with the 531,131 "extra" digits added (604,388 in all), as the SAM paper trains
        # SVHN (Appendix B.1); the test set is SVHN's.
        DatasetSpec(
            name="svhn_extra",
            num_classes=10,
            image_shape=(32, 32, 3),
            subdirs=("svhn", "SVHN"),
            mirrors=_SVHN_MIRRORS,
            remote=(_SVHN_TRAIN, _SVHN_EXTRA, _SVHN_TEST),
        ),
        DatasetSpec(
            name="mnist",
            num_classes=10,
            image_shape=(28, 28, 1),
            subdirs=("mnist", "MNIST/raw"),
            mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
            remote=(
                RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "mnist"),
                RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "mnist"),
                RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "mnist"),
                RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "mnist"),
            ),
        ),
        DatasetSpec(
            name="fashion_mnist",
            num_classes=10,
            image_shape=(28, 28, 1),
            subdirs=("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
            mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            remote=(
                RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "fashion_mnist"),
                RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "fashion_mnist"),
                RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "fashion_mnist"),
                RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "fashion_mnist"),
            ),
        ),
        DatasetSpec(name="digits", num_classes=10, image_shape=(8, 8, 1), subdirs=()),
    )
}

DATASETS: tuple[str, ...] = tuple(SPECS)

_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist"}


def get_spec(name: str) -> DatasetSpec:
    """The spec of ``name`` (case-insensitive; ``-`` and ``_`` are interchangeable), else ``ValueError``."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key.replace("-", "_"))
    if key not in SPECS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return SPECS[key]
