r"""SAM's random-direction control (Foret et al., ICLR 2021, Appendix C.5): a perturbation of norm :math:`\rho`
in a random direction, to show that SAM's adversarial direction is what matters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from sharpness.optim.directions import gaussian
from sharpness.optim.sam import SAM

__all__ = ["RandomDirectionSAM"]


class RandomDirectionSAM(SAM):
    r"""The gradient at :math:`w + \rho z/\|z\|`, :math:`z \sim N(0, I)` drawn afresh each step, applied to :math:`w`.

    The direction does not depend on the gradient, so a step takes one pass: call :meth:`first_step` *before* the
    forward pass, then the forward and backward, then :meth:`step`; ``opt.step(closure)`` does the same and returns
    the loss at the perturbed point. (The paper does not say whether its control also ran the clean pass; its
    result would not change.) The draws come from a generator per device, saved in :meth:`state_dict`; under FSDP2
    each rank draws its own shards of :math:`z` from a stream of its own (:math:`\|z\|` is taken over all of it).

    Args:
        params, base_optimizer, rho: as for :class:`SAM`.
        seed: the generators' seed (default: drawn from torch's global generator).
        **options: SAM's other options and the base optimizer's.
    """

    perturbs_before_pass = True
    _supports_subsets = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        *,
        seed: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, **options)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            offset = 0 if device.index is None else device.index + 1
            if self._sharded:  # each rank draws its own shards of z: one stream per rank
                import torch.distributed as dist

                offset += (dist.get_rank() + 1) << 16
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed + offset)
        return self._generators[device]

    def _direction(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        return gaussian(params, {p.device: self._generator(p.device) for p in params})

    def _extra_state(self) -> dict[str, Any]:
        return {"generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        for device, generator_state in state.get("generators", {}).items():
            self._generator(torch.device(device)).set_state(generator_state)
