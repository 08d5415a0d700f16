"""Random probe vectors for the spectral algorithms, and the seeds they are drawn from.

Probes (Lanczos and power-iteration starts, SLQ starts, Hutchinson vectors) are drawn directly
on the operator's device and in its dtype from a ``torch.Generator`` on that device, so no
host-side draw or host-to-device copy sits in the loop. A seed gives the same vectors on every
run on the same kind of device; CPU and CUDA generators produce different streams, so results
drawn from the same seed on a CPU and on a GPU are different samples (equally valid ones).

:func:`derive_seed` gives each method of one analysis its own stream (numpy's ``SeedSequence``,
the standard way of spawning independent streams from one seed), so that, e.g., the SLQ starts
are not the first Hutchinson probes and power iteration does not start from the Lanczos vector.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor

__all__ = ["random_vector", "probe_generator", "derive_seed"]


def probe_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for the named ``stream`` (e.g. ``"lanczos"``, ``"trace"``) of ``seed``.

    Different stream names give statistically independent seeds; the same ``(seed, stream)``
    always gives the same one.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    state = np.random.SeedSequence([int(seed), zlib.crc32(stream.encode())]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def random_vector(
    dim: int,
    generator: torch.Generator,
    *,
    distribution: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A random vector drawn from ``generator`` on its device (``device``, when given, must be
    the same), in ``dtype``: standard Gaussian entries, or Rademacher entries (:math:`\\pm1`)."""
    device = generator.device if device is None else torch.device(device)
    if device.type != generator.device.type:
        raise ValueError(f"the generator lives on {generator.device}, the vector is asked for on {device}")
    if distribution == "gaussian":
        return torch.randn(dim, generator=generator, dtype=dtype, device=device)
    if distribution == "rademacher":
        return torch.randint(0, 2, (dim,), generator=generator, dtype=dtype, device=device) * 2 - 1
    raise ValueError(f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}")
