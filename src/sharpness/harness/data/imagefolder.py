"""Image-folder data sets (ImageNet and the SAM paper's finetuning sets), decoded and cropped on the CPU.

Layouts read by :func:`load_imagefolder` (``root`` is the folder given):

* ``root/train/<class>/**/*.{jpg,jpeg,png}`` and ``root/val/<class>/**/*`` (extensions in any case). Classes are
  the sorted names of ``train``'s sub-folders (as torchvision's ``ImageFolder``; names starting with ``.`` are
  skipped), class ``i`` the ``i``-th name; ``val`` must use a subset of them.
* The official ImageNet validation layout: a flat ``root/val/*.JPEG`` and a ground-truth file, looked for in
  ``root/val`` and then ``root`` (or passed as ``labels_file``):

  - ``LOC_val_solution.csv`` (the Kaggle ILSVRC distribution): a header ``ImageId,PredictionString``, then one
    row per image, ``ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...``; the image's class is the first
    word of ``PredictionString``, a synset that must be one of the train folders.
  - ``val_labels.txt``: one ``filename class`` line per image (blank lines and ``#`` comments skipped);
    ``class`` is a train folder name (``n01440764``) or a 0-based index into the sorted folder names (Caffe's
    ``val.txt`` convention; not the devkit's 1-based ILSVRC2012_ID, which follows another order).

  Images are matched to rows by file name without extension; every image needs a row (rows without an image
  are ignored, so a partial copy of ``val`` still reads).

Transforms (the standard ImageNet ones, He et al. 2016 and the SAM paper's Section 3.1): training is the
Inception crop (Szegedy et al. 2015) of :func:`random_resized_crop_box` (area (0.08, 1), aspect (3/4, 4/3)),
resized to 224 (bilinear) and mirrored with probability 1/2; evaluation resizes the shorter side to 256 and
takes the central 224 x 224. Both give a uint8 CHW tensor: normalisation (:data:`IMAGENET_MEAN`,
:data:`IMAGENET_STD`, :func:`normalize`) happens on the training device, a quarter of the bytes to move.
JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the crop is that much larger than its output (libjpeg's DCT
scaling: Pillow's ``draft``, simplejpeg's ``min_factor``), which changes pixels by less than resampling noise
and saves most of the decode (see ``benchmarks/bench_decode.py``).

Randomness: a training sample is asked for by the key ``(epoch, index)`` (:class:`EpochSampler` yields them)
and its crop and flip are drawn from a generator seeded by ``(seed, epoch, index)`` alone
(:func:`sample_rng`). Which worker process decodes it, how many workers there are, how many ranks share the
epoch and whether the run was resumed change nothing; no worker seeding is needed.
"""

from __future__ import annotations

import csv
import math
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from sharpness.harness.seeds import epoch_seed

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LABEL_FILES",
    "ImageFolderError",
    "ImageReadError",
    "ImageList",
    "read_split",
    "load_imagefolder",
    "ImageSource",
    "random_resized_crop_box",
    "TrainTransform",
    "EvalTransform",
    "eval_geometry",
    "sample_rng",
    "ImageFolderDataset",
    "EpochSampler",
    "ShardSampler",
    "make_loader",
    "normalize",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")
"""Ground-truth files of the flat validation layout, in the order they are looked for."""

Decoder = Literal["pillow", "simplejpeg"]


class ImageFolderError(ValueError):
    """The folder layout or a labels file is wrong; the message is one line naming the path."""


class ImageReadError(ValueError):
    """An image file could not be read or decoded; the message starts with its path (a ValueError: bad input data,
    which the command line reports in one line)."""


# ---------------------------------------------------------------------------------------------- file lists
@dataclass(frozen=True)
class ImageList:
    """The images of one split: paths relative to ``root`` (a numpy bytes array, so that forked loader workers
    share it without touching a refcount per file), int64 labels, and the class names in label order."""

    root: Path
    files: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.files[index])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_dirs(split_dir: Path) -> list[str]:
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _walk_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively, following links), relative to it, in sorted order."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(parent, folder)
        found.extend(name if rel == "." else os.path.join(rel, name) for name in sorted(files) if _is_image(name))
    return found


def _read_class_folders(split_dir: Path, classes: Sequence[str] | None) -> ImageList:
    names = _class_dirs(split_dir)
    if classes is None:
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ImageFolderError(
                f"{split_dir}: class folders {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                f"are not among the {len(classes)} training classes"
            )
    index = {name: i for i, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for name in names:
        images = _walk_images(split_dir / name)
        if not images:
            raise ImageFolderError(f"{split_dir / name}: class folder without images ({', '.join(IMAGE_EXTENSIONS)})")
        files.extend(os.path.join(name, f) for f in images)
        labels.extend([index[name]] * len(images))
    return ImageList(split_dir, _bytes_array(files), np.asarray(labels, dtype=np.int64), tuple(classes))


def _bytes_array(files: list[str]) -> np.ndarray:
    return np.array([os.fsencode(f) for f in files], dtype=np.bytes_) if files else np.zeros(0, dtype="S1")


def _find_labels_file(split_dir: Path) -> Path:
    for folder in (split_dir, split_dir.parent):
        for name in LABEL_FILES:
            if (folder / name).is_file():
                return folder / name
    raise ImageFolderError(
        f"{split_dir}: flat folder of images without class folders, and no {' or '.join(LABEL_FILES)} "
        f"in it or in {split_dir.parent} to label them"
    )


def _class_index(token: str, index: dict[str, int], where: str) -> int:
    if token in index:
        return index[token]
    if token.isdigit() and int(token) < len(index):
        return int(token)
    raise ImageFolderError(f"{where}: class {token!r} is not a training class folder nor an index below {len(index)}")


def _read_labels_file(path: Path, classes: Sequence[str]) -> dict[str, int]:
    """Image name without extension -> label, from a ``LOC_val_solution.csv`` or ``filename class`` file."""
    index = {name: i for i, name in enumerate(classes)}
    out: dict[str, int] = {}
    with open(path, newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.reader(f)
            header = next(reader, [])
            if header[:2] != ["ImageId", "PredictionString"]:
                raise ImageFolderError(f"{path}: expected the header ImageId,PredictionString, got {','.join(header)}")
            for line, row in enumerate(reader, start=2):
                if len(row) < 2 or not row[1].split():
                    raise ImageFolderError(f"{path}, line {line}: expected ImageId,PredictionString, got {row}")
                out[Path(row[0]).stem] = _class_index(row[1].split()[0], index, f"{path}, line {line}")
        else:
            for line, text in enumerate(f, start=1):
                fields = text.split("#", 1)[0].split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise ImageFolderError(f"{path}, line {line}: expected 'filename class', got {text.strip()!r}")
                out[Path(fields[0]).stem] = _class_index(fields[1], index, f"{path}, line {line}")
    return out


def _read_flat(split_dir: Path, classes: Sequence[str], labels_file: Path | None) -> ImageList:
    labels_file = labels_file or _find_labels_file(split_dir)
    table = _read_labels_file(Path(labels_file), classes)
    with os.scandir(split_dir) as entries:
        files = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
    stems = [Path(f).stem for f in files]
    if len(set(stems)) != len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise ImageFolderError(f"{split_dir}: images {', '.join(twice[:3])} exist with two extensions")
    missing = [f for f, s in zip(files, stems, strict=True) if s not in table]
    if missing:
        raise ImageFolderError(
            f"{labels_file}: no label for {len(missing)} of the {len(files)} images in {split_dir} "
            f"(first: {', '.join(missing[:3])})"
        )
    labels = np.asarray([table[s] for s in stems], dtype=np.int64)
    return ImageList(split_dir, _bytes_array(files), labels, tuple(classes))


def read_split(
    root: str | Path, split: str, classes: Sequence[str] | None = None, labels_file: str | Path | None = None
) -> ImageList:
    """The images of ``root/split``: class folders, or (with ``classes`` from the training split) a flat folder
    labelled by a ground-truth file (see the module docstring)."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise ImageFolderError(f"{Path(root)}: no folder {split!r} (expected {split}/<class>/*.jpg)")
    has_classes = bool(_class_dirs(split_dir))
    with os.scandir(split_dir) as entries:
        loose = sum(1 for e in entries if e.is_file() and _is_image(e.name))
    if has_classes and loose:
        raise ImageFolderError(f"{split_dir}: holds both class folders and {loose} images outside them")
    if has_classes:
        return _read_class_folders(split_dir, classes)
    if not loose:
        raise ImageFolderError(f"{split_dir}: no class folders and no images")
    if classes is None:
        raise ImageFolderError(f"{split_dir}: a flat folder of images needs the class names of the training split")
    return _read_flat(split_dir, classes, Path(labels_file) if labels_file is not None else None)


def load_imagefolder(
    root: str | Path, *, train: str = "train", val: str = "val", labels_file: str | Path | None = None
) -> tuple[ImageList, ImageList]:
    """The training and validation lists of ``root``; the validation labels use the training split's classes."""
    train_list = read_split(root, train)
    return train_list, read_split(root, val, train_list.classes, labels_file)


# ---------------------------------------------------------------------------------------------- decoding
def _simplejpeg() -> Any:
    try:
        import simplejpeg
    except ImportError as err:
        raise ImportError("decoder 'simplejpeg' needs simplejpeg: pip install 'sharpness[imagefolder]'") from err
    return simplejpeg


class ImageSource:
    """One image file, opened but not decoded: its ``size`` (width, height) is known, and :meth:`decode` decodes
    it (a JPEG at a reduced scale when asked) to an RGB Pillow image. Use as a context manager."""

    def __init__(self, path: str | Path, decoder: Decoder = "pillow") -> None:
        self.path = Path(path)
        self._data: bytes | None = None
        self._image: Image.Image | None = None
        if decoder == "simplejpeg" and self.path.suffix.lower() in (".jpg", ".jpeg"):
            sj = _simplejpeg()
            data = self.path.read_bytes()
            try:
                height, width, colorspace, _ = sj.decode_jpeg_header(data)
            except ValueError:
                colorspace = None  # not a baseline JPEG after all (ImageNet holds a PNG and CMYKs named .JPEG)
            if colorspace in ("YCbCr", "Gray", "RGB"):
                self._data, self.size = data, (width, height)
                return
        elif decoder not in ("pillow", "simplejpeg"):
            raise ValueError(f"decoder must be 'pillow' or 'simplejpeg', got {decoder!r}")
        self._image = Image.open(self.path)
        self.size = self._image.size

    def decode(self, scale: int = 1) -> Image.Image:
        """The RGB image; a JPEG decoded at ``1/scale`` (``scale`` in 1, 2, 4, 8; rounded up in size)."""
        width, height = self.size
        if self._data is not None:
            sj = _simplejpeg()
            array = sj.decode_jpeg(
                self._data,
                colorspace="RGB",
                min_height=-(-height // scale),
                min_width=-(-width // scale),
                min_factor=scale,
            )
            return Image.fromarray(array)
        assert self._image is not None
        image = self._image
        if scale > 1 and image.format == "JPEG":
            image.draft("RGB", (width // scale, height // scale))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")

    def close(self) -> None:
        if self._image is not None:
            self._image.close()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dct_scale(region: float, output: int) -> int:
    """The largest of 1, 2, 4, 8 by which a ``region``-pixel side can shrink and still cover ``output`` pixels."""
    scale = 1
    while scale < 8 and region / (2 * scale) >= output:
        scale *= 2
    return scale


def _to_chw(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------- transforms
def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` of the Inception crop (Szegedy et al., "Going Deeper with
    Convolutions", 2015, Section 6): area a uniform fraction in ``scale`` of the image, aspect ratio log-uniform in
    ``ratio``, position uniform; after 10 draws that do not fit, the central crop of the whole image with its aspect
    ratio clamped into ``ratio`` (the algorithm of torchvision's ``RandomResizedCrop``)."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """Inception crop of ``size`` x ``size`` (bilinear) and a horizontal flip with probability 1/2, drawn from
    ``rng``; ``dct_scaling`` decodes JPEGs at the largest 1/2^k scale that still covers the crop's output."""

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        dct_scaling: bool = True,
    ) -> None:
        self.size, self.scale, self.ratio, self.flip, self.dct_scaling = size, scale, ratio, flip, dct_scaling

    def draw(self, width: int, height: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box ``(left, top, width, height)`` of a ``width`` x ``height`` image and whether to mirror it,
        in this order from ``rng`` (the flip is drawn even without ``flip``, so that it does not shift later draws);
        the DALI path draws through this too."""
        box = random_resized_crop_box(width, height, rng, self.scale, self.ratio)
        mirror = bool(rng.random() < 0.5)
        return box, self.flip and mirror

    def __call__(self, source: ImageSource, rng: np.random.Generator | None) -> Tensor:
        if rng is None:
            raise TypeError("the training transform is random: ask for samples by (epoch, index), see EpochSampler")
        width, height = source.size
        (left, top, w, h), mirror = self.draw(width, height, rng)
        k = _dct_scale(min(w, h), self.size) if self.dct_scaling else 1
        image = source.decode(k)
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        out = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if mirror:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_chw(out)


class EvalTransform:
    """Resize the shorter side to ``resize`` (bilinear; the longer in proportion, truncated) and take the central
    ``size`` x ``size``; deterministic. ``dct_scaling`` (off by default, so that published accuracies compare)
    decodes JPEGs at the largest 1/2^k scale whose shorter side is still at least ``resize``."""

    def __init__(self, size: int = 224, resize: int = 256, dct_scaling: bool = False) -> None:
        if resize < size:
            raise ValueError(f"resize ({resize}) must be at least the crop size ({size})")
        self.size, self.resize, self.dct_scaling = size, resize, dct_scaling

    def __call__(self, source: ImageSource, rng: np.random.Generator | None = None) -> Tensor:
        width, height = source.size
        short = min(width, height)
        k = _dct_scale(short, self.resize) if self.dct_scaling else 1
        image = source.decode(k)
        new_width, new_height, left, top = eval_geometry(width, height, self.size, self.resize)
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
        return _to_chw(image.crop((left, top, left + self.size, top + self.size)))


def eval_geometry(width: int, height: int, size: int, resize: int) -> tuple[int, int, int, int]:
    """``(new_width, new_height, left, top)`` of the evaluation transform: the image resized so that its shorter
    side is ``resize`` (the longer in proportion, truncated), then the ``size`` x ``size`` crop at ``(left,
    top)``, central (rounded half to even)."""
    if width <= height:
        new = (resize, int(resize * height / width))
    else:
        new = (int(resize * width / height), resize)
    return new[0], new[1], int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index``'s augmentation in ``epoch`` of a run seeded ``seed``: the run's augment
    stream of that epoch (:func:`sharpness.harness.seeds.epoch_seed`) mixed with the index by ``SeedSequence``."""
    return np.random.default_rng(np.random.SeedSequence([epoch_seed(seed, epoch, "augment"), index]))


def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Float32 ``(x / 255 - mean) / std`` per channel of a uint8 NCHW batch (on its device)."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


# ---------------------------------------------------------------------------------------------- dataset, samplers
class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs of an :class:`ImageList`.

    ``dataset[(epoch, index)]`` applies ``transform`` with :func:`sample_rng` ``(seed, epoch, index)``;
    ``dataset[index]`` applies it without a generator (deterministic transforms: :class:`EvalTransform`). The
    image is a uint8 CHW tensor, or with ``transform=None`` the decoded RGB Pillow image. An unreadable or corrupt
    file raises :class:`ImageReadError` naming it.
    """

    def __init__(self, images: ImageList, transform: Any = None, *, seed: int = 0, decoder: Decoder = "pillow") -> None:
        if decoder == "simplejpeg":
            _simplejpeg()
        self.images, self.transform, self.seed, self.decoder = images, transform, seed, decoder

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        rng = None if epoch is None else sample_rng(self.seed, epoch, index)
        path = self.images.path(index)
        try:
            with ImageSource(path, self.decoder) as source:
                if self.transform is not None:
                    image = self.transform(source, rng)
                else:  # a copy: closing the source frees the decoded image of a Pillow file
                    image = source.decode().copy()
        except TypeError:  # a mistake of the caller (a random transform asked for by index), not of the file
            raise
        except Exception as err:  # Pillow raises OSError, SyntaxError, DecompressionBombError, zlib.error, ...
            raise ImageReadError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
        return image, int(self.images.labels[index])


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's keys ``(epoch, index)`` of epoch ``epoch``, batch by batch.

    The epoch's order is the permutation of (seed, epoch) that :func:`sharpness.harness.loader.epoch_permutation`
    gives the in-memory data sets; global batch ``b`` is ``order[b * batch_size : (b + 1) * batch_size]`` (the
    last partial batch is dropped) and rank ``r`` of ``world_size`` takes its ``r``-th contiguous share, so the
    ranks together see the batches a single process would, whatever their number. Call :meth:`set_epoch` before
    iterating; ``start_batch`` resumes in the middle of an epoch. The loader's batch size is
    ``batch_size // world_size``.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})")
        if num_samples < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {num_samples} training examples")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.start_batch = 0

    @property
    def num_batches(self) -> int:
        return self.num_samples // self.batch_size

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.local_batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, "order"))
        order = torch.randperm(self.num_samples, generator=gen)
        local = self.local_batch_size
        for b in range(self.start_batch, self.num_batches):
            first = b * self.batch_size + self.rank * local
            for i in order[first : first + local].tolist():
                yield self.epoch, i


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of an evaluation set: every example on exactly one rank, no
    padding, so summed counts give exact metrics."""

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))


def _worker_init(worker_id: int) -> None:
    """Loader workers ignore SIGINT and SIGTERM, which a terminal or ``timeout`` also sends them: the training
    process decides when to stop (after checkpointing) and shuts its workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(
    dataset: ImageFolderDataset,
    sampler: Sampler,
    batch_size: int,
    *,
    workers: int = 8,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A ``DataLoader`` of uint8 NCHW batches from ``workers`` processes (0: in this one), kept alive across
    epochs; ``batch_size`` is the per-rank one (:attr:`EpochSampler.local_batch_size`).

    The loader has a generator of its own: each iteration draws the workers' base seed from it, which would
    otherwise come from torch's global generator and shift a resumed run's dropout."""
    extra: dict[str, Any] = {}
    if workers:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor, "worker_init_fn": _worker_init}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        **extra,
    )
