"""Image-folder data streamed from disk through loader workers: the trainer's second data source.

The in-memory data sets live on the device as one tensor (:class:`sharpness.harness.loader.DeviceData`); an image
folder such as ImageNet does not fit there, so :class:`StreamingData` serves the same interface (``len``,
``num_batches``, ``shuffled``, ``in_order``) from a :func:`~sharpness.harness.data.imagefolder.make_loader`
``DataLoader`` (or, with ``decoder: dali``, from NVIDIA DALI's
:class:`~sharpness.harness.data.dali_decode.DaliBatches`). The trainer's loop does not tell them apart.

Training batches follow :class:`~sharpness.harness.data.imagefolder.EpochSampler`: the epoch's order is the
permutation of (seed, epoch) that ``DeviceData`` uses, rank ``r`` takes its contiguous share of every global batch,
and each sample's Inception crop and flip come from (seed, epoch, index) alone, so neither the number of loader
workers nor a resume changes what a run sees. Evaluation is sharded by
:class:`~sharpness.harness.data.imagefolder.ShardSampler` (every image on exactly one rank, no padding;
:attr:`StreamingData.per_rank`): each rank sums its counts and the trainer all-reduces them. The preprocessing is
the SAM paper's for ImageNet (Section 3.1: Inception crop and flip at ``image_size``, evaluation on the central
``image_size`` crop of the image resized to ``eval_resize``); BatchNorm stays per replica, as the paper's code
normalises (each replica also perturbs with its own share, m-sharpness).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sharpness.harness.config import IMAGEFOLDER, ConfigError, TrainConfig
from sharpness.harness.data.dali_decode import DaliBatches, DaliEvalSpec, DaliTrainSpec
from sharpness.harness.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochSampler,
    EvalTransform,
    ImageFolderDataset,
    ImageList,
    ImageReadError,
    ShardSampler,
    TrainTransform,
    load_imagefolder,
    make_loader,
)

__all__ = ["ImageFolderData", "StreamingData", "prepare_imagefolder"]

# A worker's exception comes back as "Caught ImageReadError in DataLoader worker ...", then its traceback,
# ending with the original one-line message.
_WORKER_ERROR = re.compile(r"^\S*ImageReadError: (?P<message>.*)$", re.MULTILINE)


class StreamingData:
    """Batches of an :class:`ImageList` from ``loader`` (a ``DataLoader`` of :func:`make_loader`, or DALI's
    :class:`~sharpness.harness.data.dali_decode.DaliBatches`), moved to ``device`` (uint8 NCHW, int64).

    With an :class:`EpochSampler` it serves :meth:`shuffled` training batches (``batch_size`` and ``seed`` must
    be the sampler's); with a :class:`ShardSampler` it serves :meth:`in_order` this rank's share of an evaluation
    set (:attr:`per_rank`). ``loader`` iterates over ``sampler``'s current epoch.
    """

    def __init__(
        self,
        images: ImageList,
        sampler: EpochSampler | ShardSampler,
        batch_size: int,
        device: torch.device,
        loader: Iterable[tuple[Tensor, Tensor]] | DataLoader,
    ) -> None:
        self.images, self.sampler, self.batch_size, self.device = images, sampler, batch_size, device
        self.per_rank = isinstance(sampler, ShardSampler)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.images)

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        if not drop_last:
            return -(-len(self) // batch_size)
        return self._sampler(EpochSampler, batch_size).num_batches

    def _sampler(self, kind: type, batch_size: int) -> EpochSampler | ShardSampler:
        if not isinstance(self.sampler, kind) or (kind is EpochSampler and batch_size != self.sampler.batch_size):
            raise ValueError(f"this loader serves {type(self.sampler).__name__} batches of {self.batch_size}")
        return self.sampler

    def shuffled(self, batch_size: int, seed: int, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's share of the global training batches of ``epoch``, from batch ``start`` on (skipped without
        decoding them); the last partial batch is dropped."""
        sampler = self._sampler(EpochSampler, batch_size)
        if seed != sampler.seed:
            raise ValueError(f"the loader's order is seeded {sampler.seed}, not {seed}")
        sampler.set_epoch(epoch, start_batch=start)
        return self._batches()

    def in_order(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's evaluation batches (all of them on one process)."""
        if batch_size != self.batch_size:
            raise ValueError(f"this loader serves batches of {self.batch_size}, not {batch_size}")
        self._sampler(ShardSampler, batch_size)
        return self._batches()

    @property
    def max_local_batches(self) -> int:
        """The most evaluation batches any rank has (FSDP's ranks must run as many forwards as each other)."""
        sampler = self._sampler(ShardSampler, self.batch_size)
        most = -(-sampler.num_samples // sampler.world_size)
        return -(-most // self.batch_size)

    def local_batches(self) -> int:
        return len(self.loader)

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        try:
            for images, labels in self.loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        except ImageReadError as err:  # one line naming the file, also when a worker process read it
            match = _WORKER_ERROR.search(str(err))
            raise ImageReadError(match["message"] if match else str(err)) from None


@dataclass
class ImageFolderData:
    """What a run on an image folder trains and evaluates on: the streamed training set, the evaluated splits by
    name (``test``: the folder's ``val/``, the split the paper reports), the class names in label order, and the
    normalisation applied on the device."""

    train_set: StreamingData
    eval_sets: dict[str, StreamingData]
    classes: tuple[str, ...]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def prepare_imagefolder(config: TrainConfig, device: torch.device, shard: tuple[int, int] = (0, 1)) -> ImageFolderData:
    """The loaders of ``config.data_dir``'s ``train/`` and ``val/`` (:func:`load_imagefolder`) for data-parallel
    rank ``shard[0]`` of ``shard[1]``. The folders are listed here, before the run directory is written, so a
    wrong layout fails the start in one line."""
    if config.dataset != IMAGEFOLDER:
        raise ValueError(f"prepare_imagefolder: dataset is {config.dataset}, not {IMAGEFOLDER}")
    if config.data_dir is None:
        raise ConfigError(
            f"dataset: {IMAGEFOLDER} needs data_dir (--data-dir DIR), the folder holding train/<class>/ and val/"
        )
    rank, world = shard
    train_list, val_list = load_imagefolder(Path(config.data_dir).expanduser(), labels_file=config.labels_file)
    sampler = EpochSampler(len(train_list), config.batch_size, config.seed, rank=rank, world_size=world)
    shards = ShardSampler(len(val_list), rank=rank, world_size=world)
    local, workers = sampler.local_batch_size, config.loader_workers
    if config.decoder == "dali":
        train_loader: Iterable[tuple[Tensor, Tensor]] = DaliBatches(
            train_list, sampler, DaliTrainSpec(config.image_size, config.seed, config.hflip), local, device, workers
        )
        test_loader: Iterable[tuple[Tensor, Tensor]] = DaliBatches(
            val_list,
            shards,
            DaliEvalSpec(config.image_size, config.eval_resize),
            config.eval_batch_size,
            device,
            workers,
        )
    else:
        pin = device.type == "cuda"
        train_set = ImageFolderDataset(
            train_list, TrainTransform(config.image_size, flip=config.hflip), seed=config.seed, decoder=config.decoder
        )
        val_set = ImageFolderDataset(
            val_list, EvalTransform(config.image_size, config.eval_resize), decoder=config.decoder
        )
        train_loader = make_loader(train_set, sampler, local, workers=workers, pin_memory=pin)
        test_loader = make_loader(val_set, shards, config.eval_batch_size, workers=workers, pin_memory=pin)
    train = StreamingData(train_list, sampler, local, device, train_loader)
    test = StreamingData(val_list, shards, config.eval_batch_size, device, test_loader)
    return ImageFolderData(train, {"test": test}, train_list.classes)
