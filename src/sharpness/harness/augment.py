"""Batched training-set augmentation on the training device (no DataLoader, no per-image Python loop).

The trainer keeps the data set as one uint8 NCHW tensor on the device and calls an :class:`Augmentation`
on whole batches. Every random draw comes from the ``generator`` passed to ``forward`` (or the device's
default generator), every per-image choice is a tensor mask, and nothing reads a value back to the host,
so a CUDA batch is augmented without synchronising.

Pipelines (:data:`AUGMENTATIONS`):

* ``"none"``: scale to [0, 1] and normalise with the data set's mean and std.
* ``"basic"`` (the SAM paper's "basic augmentations"): zero-pad ``pad`` pixels on each side, crop a
  random ``image_size`` window, flip horizontally with probability 1/2. ``pad`` is 4 for 32x32 images
  and ``image_size / 8`` rounded half up in general (28 -> 4, the pad SAM's reference code uses for
  Fashion-MNIST; 8 -> 1). Padding is black (pixel value 0) before normalisation, as torchvision's
  ``RandomCrop(padding=4)``.
* ``"cutout"``: basic, then Cutout (DeVries & Taylor 2017): per image, a centre drawn uniformly over the
  image and the rows/columns ``centre - size // 2 .. centre + size // 2 - 1`` clipped at the border are
  set to 0 *after* normalisation, so the patch is the data-set mean colour. That is what DeVries &
  Taylor's code (Cutout after Normalize), the AutoAugment code and SAM's code do; zeroing before
  normalisation would paint black patches instead.
* ``"autoaugment"``: AutoAugment policy, then basic, then Cutout -- the order of the AutoAugment code
  (``apply_policy``, ``zero_pad_and_crop``, ``random_flip``, ``cutout_numpy``) and of SAM's code
  (policy on uint8, crop and flip, normalise, batch Cutout). The policy first sees the whole image,
  not a window with black padding in it.

AutoAugment is hand-written here rather than taken from ``kornia.augmentation.auto.AutoAugment``
(kornia 0.9), which differs from the policy the paper searched and published:

* kornia draws one sub-policy per call for the whole batch; the paper draws one per image;
* kornia maps a magnitude bin to a signed interval, so e.g. ``("rotate", 0.7, 2)`` always rotates by -12
  to -18 degrees, where the reference code rotates by 6 degrees with a random sign; its shear multiplies
  the shear factor by 180 and uses it as an angle (level 9: up to tan(54 deg) = 1.38 instead of 0.3);
  its solarize weakens as the level rises, the reference's strengthens;
* kornia draws from the global RNG only (no per-call generator).

The operations below follow Cubuk et al.'s reference implementation (``augmentation_transforms.py``,
PIL on uint8, ``PARAMETER_MAX = 10``): the magnitude level ``m`` maps to a shear of ``0.3 m / 10``
(about the top-left corner), a translation of ``m`` pixels for 32x32 images (``m * image_size / 32``
otherwise), a rotation of ``int(3 m)`` degrees (about the centre), each with a random sign; enhance
factors ``0.1 + 1.8 m / 10``; solarize threshold ``256 - int(25.6 m)``; posterize to ``4 - int(0.4 m)``
bits. Pixels stay integer-valued in [0, 255] between operations, as PIL's uint8 images do, and the
per-operation formulas are PIL's (nearest-neighbour sampling, truncating blends). Pixels that a
geometric operation moves in from outside the image get the data-set mean colour (the reference ends with
0 after normalisation there; SAM's code uses grey 128). The sub-policy tables are kornia's copies of the
published ones.

The random draws of one ``forward`` call, in this order: sub-policy per image, then per stage an
apply-uniform and a sign-uniform per image (AutoAugment only); crop offsets and flip (basic and later);
cutout centre (cutout and autoaugment).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from kornia.augmentation.auto.autoaugment.autoaugment import cifar10_policy, svhn_policy
from torch import Tensor, nn

__all__ = [
    "AUGMENTATIONS",
    "POLICIES",
    "Augmentation",
    "AutoAugmentPolicy",
    "build_augmentation",
    "crop_padding",
    "cutout",
    "random_crop_flip",
]

AUGMENTATIONS: tuple[str, ...] = ("none", "basic", "cutout", "autoaugment")
POLICIES: dict[str, list] = {"cifar10": cifar10_policy, "svhn": svhn_policy}

_GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def crop_padding(image_size: int) -> int:
    """Zero padding for the random crop: ``image_size / 8`` rounded half up, at least 1 (32 -> 4)."""
    return max(1, (image_size + 4) // 8)


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    src = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=src).to(device, non_blocking=True)


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    src = generator.device if generator is not None else device
    return torch.randint(high, (n,), generator=generator, device=src).to(device, non_blocking=True)


def _sample(x: Tensor, rows: Tensor, cols: Tensor, fill: Tensor | float) -> Tensor:
    """``out[n, :, i, j] = x[n, :, rows[n, i, j], cols[n, i, j]]``, ``fill`` where that is outside ``x``.

    ``rows`` and ``cols`` are integer tensors broadcastable to ``(N, H', W')``. One gather for the
    whole batch replaces padding, cropping, flipping and nearest-neighbour warping.
    """
    n, c, h, w = x.shape
    rows, cols = torch.broadcast_tensors(rows, cols)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).reshape(n, 1, -1).expand(n, c, -1)
    out = x.reshape(n, c, h * w).gather(2, index).reshape(n, c, *rows.shape[1:])
    return torch.where(inside.unsqueeze(1), out, fill)


def random_crop_flip(x: Tensor, pad: int, generator: torch.Generator | None = None, flip: bool = True) -> Tensor:
    """Zero-pad by ``pad``, crop a random window of the input's size, mirror it with probability 1/2.

    Offsets are uniform on ``0 .. 2 pad`` in each direction, independently per image; ``flip=False`` never
    mirrors (digits: a mirrored 3 is no 3).
    """
    # Hand-written rather than kornia's RandomCrop + RandomHorizontalFlip: one gather on the uint8 batch,
    # about 2x faster on the CPU (benchmarks/bench_augment.py), drawing from ``generator`` (kornia only
    # uses the global RNG).
    n, _, h, w = x.shape
    dy = _randint(2 * pad + 1, n, generator, x.device)
    dx = _randint(2 * pad + 1, n, generator, x.device)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = (dy - pad)[:, None] + ar_h
    cols = (dx - pad)[:, None] + ar_w
    if flip:
        mirrored = _uniform(n, generator, x.device) < 0.5
        cols = torch.where(mirrored[:, None], (dx - pad)[:, None] + (w - 1 - ar_w), cols)
    return _sample(x, rows[:, :, None], cols[:, None, :], 0)


def cutout(x: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero one square per image: centre uniform over the image, sides ``2 * (size // 2)``, clipped."""
    # Not kornia's RandomErasing: it keeps the whole box inside the image, a different distribution from
    # DeVries & Taylor's clipped square; a broadcast mask is also a little faster.
    n, _, h, w = x.shape
    cy = _randint(h, n, generator, x.device)
    cx = _randint(w, n, generator, x.device)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    in_rows = (ar_h >= (cy - size // 2)[:, None]) & (ar_h < (cy + size // 2)[:, None])
    in_cols = (ar_w >= (cx - size // 2)[:, None]) & (ar_w < (cx + size // 2)[:, None])
    return x.masked_fill(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)


# --- AutoAugment operations on float images holding integers in [0, 255]; ``v`` is (N, 1, 1, 1). ---


def _blend(degenerate: Tensor, x: Tensor, v: Tensor) -> Tensor:
    # PIL's Image.blend truncates towards zero and clips to uint8.
    return (degenerate + v * (x - degenerate)).clamp(0, 255).floor()


def _luminance(x: Tensor) -> Tensor:
    if x.shape[1] != 3:
        return x
    r, g, b = x.unbind(1)
    # PIL's RGB -> L conversion in 16-bit fixed point; exact in float32 (the sum stays below 2**24).
    return torch.div(r * 19595 + g * 38470 + b * 7471 + 32768, 65536, rounding_mode="floor").unsqueeze(1)


def _invert(x: Tensor, v: Tensor) -> Tensor:
    return 255 - x


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(x >= threshold, 255 - x, x)


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    step = torch.pow(2.0, 8 - bits)
    return torch.div(x, step, rounding_mode="floor") * step


def _color(x: Tensor, v: Tensor) -> Tensor:
    return _blend(_luminance(x), x, v)


def _contrast(x: Tensor, v: Tensor) -> Tensor:
    mean = torch.floor(_luminance(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean, x, v)


def _brightness(x: Tensor, v: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, v)


def _sharpness(x: Tensor, v: Tensor) -> Tensor:
    # PIL's SMOOTH filter, (3x3 box sum + 4 centre) / 13 rounded, keeps the one-pixel border. Shifted sums
    # rather than conv2d: exact in float32 and far faster than a one-channel convolution on the CPU.
    rows = x[..., :, :-2] + x[..., :, 1:-1] + x[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    smooth = torch.floor((box + 4 * x[..., 1:-1, 1:-1]) / 13 + 0.5)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, v)


def _auto_contrast(x: Tensor, v: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255 / (hi - lo).clamp_min(1)
    return torch.where(hi > lo, (x * scale - lo * scale).floor().clamp(0, 255), x)


def _equalize(x: Tensor, v: Tensor) -> Tensor:
    # PIL's ImageOps.equalize per channel: lut[i] = (step // 2 + #pixels below i) // step, where step is
    # (#pixels - #pixels at the largest value) // 255; identity when step is 0.
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    at_max = hist.gather(1, flat.amax(dim=1, keepdim=True))
    step = (h * w - at_max) // 255
    lut = (step // 2 + hist.cumsum(1) - hist) // step.clamp_min(1)
    lut = torch.where(step > 0, lut.clamp_max(255), torch.arange(256, device=x.device))
    return lut.gather(1, flat).reshape(n, c, h, w).to(x.dtype)


_INTENSITY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "invert": _invert,
    "auto_contrast": _auto_contrast,
    "equalize": _equalize,
    "solarize": _solarize,
    "posterize": _posterize,
    "color": _color,
    "contrast": _contrast,
    "brightness": _brightness,
    "sharpness": _sharpness,
}


def _op_parameter(name: str, level: int | None, image_size: int) -> float:
    """The reference implementation's parameter for magnitude ``level`` (sign drawn later for geometry)."""
    m = level or 0
    if name in ("shear_x", "shear_y"):
        return m * 0.3 / 10
    if name in ("translate_x", "translate_y"):
        return float(int(m * image_size / 32))
    if name == "rotate":
        return float(int(m * 30 / 10))
    if name == "solarize":
        return float(256 - int(m * 256 / 10))
    if name == "posterize":
        return float(4 - int(m * 4 / 10))
    if name in ("color", "contrast", "brightness", "sharpness"):
        return m * 1.8 / 10 + 0.1
    if name in ("invert", "auto_contrast", "equalize"):
        return 0.0
    raise ValueError(f"unsupported AutoAugment operation {name!r}")


class AutoAugmentPolicy(nn.Module):
    """AutoAugment (Cubuk et al. 2019) with an independent sub-policy per image, on the whole batch.

    Per stage, all geometric operations are one nearest-neighbour gather with a per-image affine map,
    and each intensity operation is one batched tensor expression. With ``dense`` (the default on
    accelerators) every operation runs on the whole batch and ``torch.where`` picks each image's result:
    no data-dependent shapes, so no host synchronisation. Otherwise (the default on the CPU, where a
    synchronisation costs nothing) each operation runs only on the images that drew it, about 10x less
    work. Both give the same output for the same draws.

    Args:
        policy: ``"cifar10"`` or ``"svhn"``.
        image_size: side of the square images (scales the translation).
        fill: per-channel colour in [0, 255] for pixels moved in from outside the image.
        dense: see above; ``None`` chooses by the batch's device.
    """

    def __init__(self, policy: str, image_size: int, fill: Sequence[float], dense: bool | None = None) -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown AutoAugment policy {policy!r}; expected one of {sorted(POLICIES)}")
        table = POLICIES[policy]
        self.dense = dense
        self.op_names: tuple[str, ...] = tuple(sorted({name for sub in table for name, _, _ in sub}))
        ids = [[self.op_names.index(name) for name, _, _ in sub] for sub in table]
        probs = [[p for _, p, _ in sub] for sub in table]
        params = [[_op_parameter(name, m, image_size) for name, _, m in sub] for sub in table]
        self.register_buffer("op_ids", torch.tensor(ids))
        self.register_buffer("probs", torch.tensor(probs, dtype=torch.float32))
        self.register_buffer("params", torch.tensor(params, dtype=torch.float32))
        fill_t = torch.tensor([round(f) for f in fill], dtype=torch.float32)
        self.register_buffer("fill", fill_t.view(1, -1, 1, 1))
        self.register_buffer("geometric", torch.tensor([name in _GEOMETRIC for name in self.op_names]))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Apply one random sub-policy per image to ``x`` (float, integer values in [0, 255])."""
        n = x.shape[0]
        sub = _randint(self.op_ids.shape[0], n, generator, x.device)
        for stage in range(self.op_ids.shape[1]):
            applied = _uniform(n, generator, x.device) < self.probs[sub, stage]
            sign = torch.where(_uniform(n, generator, x.device) < 0.5, 1.0, -1.0)
            op = torch.where(applied, self.op_ids[sub, stage], -1)
            x = self._stage(x, op, self.params[sub, stage] * sign)
        return x

    def _stage(self, x: Tensor, op: Tensor, param: Tensor) -> Tensor:
        """Apply operation ``op[i]`` (-1: none) with signed parameter ``param[i]`` to image ``i``."""
        dense = self.dense if self.dense is not None else x.device.type != "cpu"
        branches: list[tuple[Tensor, Callable[[Tensor, Tensor, Tensor], Tensor]]] = []
        if any(name in _GEOMETRIC for name in self.op_names):
            branches.append(((op >= 0) & self.geometric[op.clamp_min(0)], self._geometric))
        for i, name in enumerate(self.op_names):
            if name in _INTENSITY:
                fn = _INTENSITY[name]
                branches.append((op == i, lambda xs, _, p, fn=fn: fn(xs, p.abs()[:, None, None, None])))
        out = x if dense else x.clone()
        for mask, fn in branches:
            if dense:
                out = torch.where(mask[:, None, None, None], fn(x, op, param), out)
            else:
                idx = mask.nonzero().squeeze(1)
                if idx.numel() > 0:
                    out[idx] = fn(x[idx], op[idx], param[idx])
        return out

    def _geometric(self, x: Tensor, op: Tensor, param: Tensor) -> Tensor:
        return self._warp(x, self._affine(op, param, x.shape[-2], x.shape[-1]))

    def _affine(self, op: Tensor, a: Tensor, h: int, w: int) -> Tensor:
        """Per-image output -> input maps in PIL's AFFINE convention, as (N, 6): identity unless geometric."""
        one, zero = torch.ones_like(a), torch.zeros_like(a)
        rad = torch.deg2rad(-a)
        cos, sin = torch.cos(rad), torch.sin(rad)
        cx, cy = w / 2, h / 2
        maps = {
            "shear_x": (one, a, zero, zero, one, zero),
            "shear_y": (one, zero, zero, a, one, zero),
            "translate_x": (one, zero, a, zero, one, zero),
            "translate_y": (one, zero, zero, zero, one, a),
            "rotate": (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy),
        }
        theta = torch.stack((one, zero, zero, zero, one, zero), dim=1)
        for i, name in enumerate(self.op_names):
            if name in maps:
                theta = torch.where((op == i)[:, None], torch.stack(maps[name], dim=1), theta)
        return theta

    def _warp(self, x: Tensor, theta: Tensor) -> Tensor:
        # PIL samples the input at floor(A (i + 1/2, j + 1/2) + t) for output pixel (i, j).
        h, w = x.shape[-2:]
        px = (torch.arange(w, device=x.device, dtype=theta.dtype) + 0.5).view(1, 1, w)
        py = (torch.arange(h, device=x.device, dtype=theta.dtype) + 0.5).view(1, h, 1)
        t = theta[:, :, None, None]
        cols = torch.floor(t[:, 0] * px + t[:, 1] * py + t[:, 2]).long()
        rows = torch.floor(t[:, 3] * px + t[:, 4] * py + t[:, 5]).long()
        return _sample(x, rows, cols, self.fill)


class Augmentation(nn.Module):
    """A training-batch augmentation pipeline; build one with :func:`build_augmentation`.

    ``forward`` takes a uint8 NCHW batch and returns the augmented, normalised float32 batch;
    :meth:`normalize` is the evaluation path (no augmentation). With ``output_size`` both end by resizing the
    normalised batch to ``output_size`` x ``output_size`` (bilinear, as a pretrained model's resolution asks: CIFAR
    finetuned at 600 pixels, the SAM paper's Table 3). Move it with ``.to(device)`` like any module;
    ``generator`` may live on the batch's device (no copies) or on the CPU.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        pad: int = 0,
        flip: bool = True,
        cutout_size: int = 0,
        policy: AutoAugmentPolicy | None = None,
        output_size: int | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {len(mean)} != {len(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.pad = pad
        self.flip = flip
        self.cutout_size = cutout_size
        self.policy = policy
        self.output_size = output_size

    def normalize(self, x_uint8_nchw: Tensor) -> Tensor:
        """``(x / 255 - mean) / std`` as float32, no augmentation (also takes float pixels in [0, 255]), resized
        to ``output_size`` where set."""
        return self._resize((x_uint8_nchw.float() / 255 - self.mean) / self.std)

    def _resize(self, x: Tensor) -> Tensor:
        if self.output_size is None or x.shape[-2:] == (self.output_size, self.output_size):
            return x
        return F.interpolate(x, size=(self.output_size, self.output_size), mode="bilinear", align_corners=False)

    def forward(self, x_uint8_nchw: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment and normalise a uint8 NCHW batch; draws from ``generator`` (default: the global RNG)."""
        if x_uint8_nchw.dtype != torch.uint8 or x_uint8_nchw.dim() != 4:
            raise ValueError(f"expected a uint8 NCHW batch, got {x_uint8_nchw.dtype} {tuple(x_uint8_nchw.shape)}")
        x = x_uint8_nchw
        if self.policy is not None:
            x = self.policy(x.float(), generator)
        if self.pad > 0:
            x = random_crop_flip(x, self.pad, generator, flip=self.flip)
        x = (x.float() / 255 - self.mean) / self.std
        if self.cutout_size > 0:
            x = cutout(x, self.cutout_size, generator)
        return self._resize(x)


def build_augmentation(
    name: str,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    image_size: int,
    policy: str = "cifar10",
    cutout_size: int = 16,
    flip: bool = True,
    output_size: int | None = None,
) -> Augmentation:
    """Build the pipeline ``name`` (one of :data:`AUGMENTATIONS`) for ``image_size`` square images.

    ``mean`` and ``std`` are per-channel, for pixel values scaled to [0, 1]. ``policy`` is the AutoAugment
    policy (``"cifar10"`` or ``"svhn"``); ``cutout_size`` the Cutout square's side; ``flip=False`` leaves out
    the horizontal flip of the crop step; ``output_size`` resizes the result (see :class:`Augmentation`).
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; expected one of {AUGMENTATIONS}")
    if name == "none":
        return Augmentation(mean, std, output_size=output_size)
    pad = crop_padding(image_size)
    if name == "basic":
        return Augmentation(mean, std, pad=pad, flip=flip, output_size=output_size)
    if name == "cutout":
        return Augmentation(mean, std, pad=pad, flip=flip, cutout_size=cutout_size, output_size=output_size)
    fill = [255 * m for m in mean]
    policy_ops = AutoAugmentPolicy(policy, image_size, fill)
    return Augmentation(
        mean, std, pad=pad, flip=flip, cutout_size=cutout_size, policy=policy_ops, output_size=output_size
    )
