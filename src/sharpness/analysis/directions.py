r"""Random filter-normalised directions in weight space (Li, Xu, Taylor, Studer, Goldstein 2018).

A direction is a dict ``{parameter name: tensor}`` shaped like the parameters. Random Gaussian
directions are rescaled *filter by filter* so that plots of :math:`L(w + \alpha d)` are
comparable across networks and insensitive to the scale invariance of ReLU/BatchNorm layers
(Li et al. 2018, §4, eq. (1)): for the :math:`j`-th filter of parameter :math:`i`,

.. math::
    d_{i,j} \leftarrow \frac{d_{i,j}}{\|d_{i,j}\|}\, \|w_{i,j}\|,

where a filter is a slice along the first dimension: an output channel of a convolution kernel,
a row (output unit) of a linear layer's weight matrix.

Tensors with at most one dimension (biases, BatchNorm and LayerNorm scales and shifts) get a zero
direction when ``ignore_bias_bn`` is true (Li et al.'s ``--xignore biasbn``); otherwise each is
rescaled as a single filter, :math:`d_i \leftarrow d_i \|w_i\| / \|d_i\|` (their reference code
copies :math:`w_i` instead; a random direction keeps the two directions of a 2-D slice
independent). Buffers such as BatchNorm running statistics are not part of any direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sharpness.analysis.model_state import select_parameters

__all__ = ["Direction", "parameter_values", "filter_normalize", "random_direction"]

Direction = dict[str, Tensor]


def parameter_values(model: nn.Module, params: Sequence[str | nn.Parameter] | None = None) -> Direction:
    """Detached copies of the selected parameters (default: all with ``requires_grad``) by name."""
    names, chosen = select_parameters(model, params)
    return {n: p.detach().clone() for n, p in zip(names, chosen, strict=True)}


def filter_normalize(direction: Direction, weights: Direction, *, ignore_bias_bn: bool = True) -> Direction:
    """Rescale each filter of ``direction`` to the norm of the same filter of ``weights``.

    A filter whose direction is zero stays zero.
    """
    out: Direction = {}
    for name, d in direction.items():
        w = weights[name].to(dtype=d.dtype, device=d.device)
        if w.shape != d.shape:
            raise ValueError(f"{name}: direction shape {tuple(d.shape)} != weight shape {tuple(w.shape)}")
        if d.dim() <= 1:
            if ignore_bias_bn:
                out[name] = torch.zeros_like(d)
                continue
            d_norm, w_norm = torch.linalg.vector_norm(d), torch.linalg.vector_norm(w)
        else:
            d_norm = torch.linalg.vector_norm(d.flatten(1), dim=1).view(-1, *([1] * (d.dim() - 1)))
            w_norm = torch.linalg.vector_norm(w.flatten(1), dim=1).view_as(d_norm)
        scale = torch.where(d_norm > 0, w_norm / torch.where(d_norm > 0, d_norm, 1.0), 0.0)
        out[name] = d * scale
    return out


def random_direction(
    model: nn.Module,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    ignore_bias_bn: bool = True,
    params: Sequence[str | nn.Parameter] | None = None,
) -> Direction:
    """A Gaussian direction, filter-normalised to ``model``'s current weights.

    Drawn on the CPU from ``generator`` (or a new one seeded with ``seed``), parameter by
    parameter in the model's order, so a seed gives the same direction on any device.
    """
    gen = torch.Generator().manual_seed(seed) if generator is None else generator
    weights = parameter_values(model, params)
    raw = {
        n: torch.randn(w.shape, generator=gen, dtype=torch.float64).to(dtype=w.dtype, device=w.device)
        for n, w in weights.items()
    }
    return filter_normalize(raw, weights, ignore_bias_bn=ignore_bias_bn)
