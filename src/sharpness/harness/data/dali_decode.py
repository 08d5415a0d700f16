"""Image-folder batches decoded by NVIDIA DALI (``decoder: dali``): on the GPU (nvJPEG) when training runs on CUDA.

The crops and flips are still this package's: for every key ``(epoch, index)`` of
:class:`~sharpness.harness.data.imagefolder.EpochSampler` the Inception crop box and the flip are drawn from
:func:`~sharpness.harness.data.imagefolder.sample_rng` by the Pillow path's own
:meth:`~sharpness.harness.data.imagefolder.TrainTransform.draw`, and DALI is handed the file's bytes, the box and
the flag. DALI decodes only the box (``decoders.image_slice``), resizes it to ``image_size`` (bilinear, antialiased)
and mirrors it; nothing is drawn from DALI's own generator. So, as with Pillow, neither the number of threads nor a
resume changes which crops a run sees, and a resumed run is bit-identical to an uninterrupted one on the same
device. The pixels are not Pillow's: DALI's resampling and the GPU's IDCT differ from Pillow's (by about 0.2 grey
levels on average on the CPU; ``tests/harness/data/test_dali_decode.py`` bounds the difference), so a run with
``decoder: dali`` is not bit-identical to one with ``decoder: pillow``.

Evaluation resizes the shorter side to ``eval_resize`` and takes the central ``image_size`` crop, with the sizes
and offsets of :class:`~sharpness.harness.data.imagefolder.EvalTransform`
(:func:`~sharpness.harness.data.imagefolder.eval_geometry`).

Per batch, a thread reads the next batch's files and image headers (Pillow reads only the header) while DALI
decodes the current one with ``loader_workers`` threads; DALI runs where the training does (``device="mixed"``
on CUDA, its CPU decoder, libjpeg-turbo, otherwise). A file whose header cannot be read, or that DALI cannot
decode, stops the run with :class:`~sharpness.harness.data.imagefolder.ImageReadError` naming it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sharpness.harness.data.imagefolder import (
    EpochSampler,
    ImageList,
    ImageReadError,
    ShardSampler,
    TrainTransform,
    eval_geometry,
    sample_rng,
)

__all__ = ["DaliTrainSpec", "DaliEvalSpec", "DaliBatches", "require_dali"]


def require_dali() -> Any:
    """The ``nvidia.dali`` module, or an ImportError saying how to install it."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "decoder 'dali' needs NVIDIA DALI: pip install 'sharpness[dali]' (nvidia-dali-cuda120, Linux x86_64)"
        ) from err
    return dali


@dataclass(frozen=True)
class DaliTrainSpec:
    """The training transform: Inception crop (``scale``, ``ratio``) resized to ``size``, mirrored with
    probability 1/2 where ``flip``; drawn per sample from ``sample_rng(seed, epoch, index)``."""

    size: int = 224
    seed: int = 0
    flip: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class DaliEvalSpec:
    """The evaluation transform: shorter side resized to ``resize``, central ``size`` x ``size`` crop."""

    size: int = 224
    resize: int = 256


def _pipeline(spec: DaliTrainSpec | DaliEvalSpec, batch_size: int, threads: int, device_id: int | None) -> Any:
    dali = require_dali()
    fn, types = dali.fn, dali.types
    decode_on = "cpu" if device_id is None else "mixed"

    @dali.pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        exec_async=False,
        exec_pipelined=False,
        prefetch_queue_depth=1,
    )
    def build() -> Any:
        data = fn.external_source(name="data", dtype=types.UINT8)
        if isinstance(spec, DaliTrainSpec):
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
            shape = fn.external_source(name="shape", dtype=types.FLOAT)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            image = fn.decoders.image_slice(
                data,
                anchor,
                shape,
                device=decode_on,
                output_type=types.RGB,
                axis_names="WH",
                normalized_anchor=False,
                normalized_shape=False,
            )
            image = fn.resize(image, resize_x=spec.size, resize_y=spec.size, interp_type=types.INTERP_LINEAR)
            image = fn.flip(image, horizontal=mirror)
        else:
            width = fn.external_source(name="width", dtype=types.FLOAT)
            height = fn.external_source(name="height", dtype=types.FLOAT)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
            image = fn.decoders.image(data, device=decode_on, output_type=types.RGB)
            image = fn.resize(image, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR)
            image = fn.slice(
                image,
                anchor,
                np.array([spec.size, spec.size], dtype=np.float32),
                axis_names="WH",
                normalized_anchor=False,
                normalized_shape=False,
            )
        return fn.transpose(image, perm=[2, 0, 1])

    pipe = build()
    pipe.build()
    return pipe


@dataclass
class _HostBatch:
    """One batch on the host: the files' paths, bytes and labels, and the per-sample inputs of the pipeline's
    other external sources by name (training: the crop box's ``anchor`` and ``shape`` and the ``mirror`` flag;
    evaluation: the resized ``width`` and ``height`` and the crop's ``anchor``)."""

    paths: list[str]
    data: list[np.ndarray]
    labels: Tensor
    inputs: dict[str, list[np.ndarray]]


class DaliBatches:
    """Batches of ``images`` in the order of ``sampler``, decoded by DALI on ``device`` (uint8 NCHW, int64 labels).

    ``sampler`` is an :class:`EpochSampler` (keys ``(epoch, index)``, with a :class:`DaliTrainSpec`) or a
    :class:`ShardSampler` (indices, with a :class:`DaliEvalSpec`); ``batch_size`` is the per-rank batch.
    """

    def __init__(
        self,
        images: ImageList,
        sampler: EpochSampler | ShardSampler,
        spec: DaliTrainSpec | DaliEvalSpec,
        batch_size: int,
        device: torch.device,
        threads: int = 4,
    ) -> None:
        if isinstance(sampler, EpochSampler) != isinstance(spec, DaliTrainSpec):
            raise ValueError(
                "DaliBatches: an EpochSampler goes with a DaliTrainSpec, a ShardSampler with a DaliEvalSpec"
            )
        self.images, self.sampler, self.spec, self.batch_size, self.device = images, sampler, spec, batch_size, device
        device_id = None
        if device.type == "cuda":
            device_id = device.index if device.index is not None else torch.cuda.current_device()
        elif device.type != "cpu":
            raise ValueError(f"decoder 'dali' decodes on CUDA or the CPU, not on {device.type}")
        self._pipe = _pipeline(spec, batch_size, max(1, threads), device_id)
        if isinstance(spec, DaliTrainSpec):
            self._train = TrainTransform(spec.size, spec.scale, spec.ratio, spec.flip)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="dali-read")

    def __len__(self) -> int:
        """Batches per pass (of the sampler's current epoch and start)."""
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        keys = list(self.sampler)
        chunks = [keys[i : i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
        if not chunks:
            return
        pending = self._reader.submit(self._read, chunks[0])
        for b in range(len(chunks)):
            host = pending.result()
            if b + 1 < len(chunks):
                pending = self._reader.submit(self._read, chunks[b + 1])
            yield self._decode(host), host.labels.to(self.device, non_blocking=True)

    def _read(self, keys: list) -> _HostBatch:
        """Files, labels and the per-sample pipeline inputs of one batch, in this thread."""
        train = isinstance(self.spec, DaliTrainSpec)
        names = ("anchor", "shape", "mirror") if train else ("width", "height", "anchor")
        batch = _HostBatch([], [], torch.empty(len(keys), dtype=torch.int64), {name: [] for name in names})
        for slot, key in enumerate(keys):
            epoch, index = key if train else (None, key)
            path = self.images.path(index)
            try:
                data = np.fromfile(path, dtype=np.uint8)
                with Image.open(io.BytesIO(data.tobytes())) as header:
                    width, height = header.size
            except Exception as err:  # OSError, PIL.UnidentifiedImageError, DecompressionBombError, ...
                raise ImageReadError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
            batch.paths.append(str(path))
            batch.data.append(data)
            batch.labels[slot] = int(self.images.labels[index])
            if train:  # the Pillow path's draws, in its order
                (left, top, w, h), mirror = self._train.draw(width, height, sample_rng(self.spec.seed, epoch, index))
                values = ([left, top], [w, h], int(mirror))
            else:
                new_width, new_height, left, top = eval_geometry(width, height, self.spec.size, self.spec.resize)
                values = ([new_width], [new_height], [left, top])
            for name, value in zip(names, values, strict=True):
                dtype = np.int32 if name == "mirror" else np.float32
                batch.inputs[name].append(np.array(value, dtype=dtype))
        return batch

    def _decode(self, host: _HostBatch) -> Tensor:
        pipe = self._pipe
        pipe.feed_input("data", host.data)
        for name, values in host.inputs.items():
            pipe.feed_input(name, values)
        try:
            (out,) = pipe.run()
        except RuntimeError as err:
            raise _culprit(host.paths, err) from None
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = out.as_tensor()
        images = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        return feed_ndarray(tensor, images, cuda_stream=stream)


def _culprit(paths: list[str], err: RuntimeError) -> ImageReadError:
    """The error naming the file of a batch DALI could not decode: the first one Pillow cannot decode either, else
    the whole batch with DALI's first line."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as bad:
            return ImageReadError(f"{path}: cannot read image ({type(bad).__name__}: {bad})")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    after = lines.index("encountered:") + 1 if "encountered:" in lines else 0
    first = lines[after] if after < len(lines) else type(err).__name__
    return ImageReadError(
        f"{paths[0]} (or one of the {len(paths)} files of its batch): DALI cannot decode it ({first})"
    )
