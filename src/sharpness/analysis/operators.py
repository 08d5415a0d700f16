"""The symmetric linear operators the spectral algorithms work on.

Lanczos, power iteration, stochastic Lanczos quadrature and Hutchinson's estimator only need
:math:`v \\mapsto Av` on flat 1-D tensors, so they accept anything with the
:class:`LinearOperator` interface: the Hessian of a training loss
(:class:`~sharpness.analysis.hessian.HessianOperator`) or an explicit matrix
(:class:`MatrixOperator`). Their random probes come from :mod:`sharpness.analysis.probes`
(:func:`random_vector` is re-exported here).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from sharpness.analysis.probes import random_vector

__all__ = ["LinearOperator", "MatrixOperator", "random_vector"]


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on :math:`\\mathbb{R}^{\\mathrm{dim}}`."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Av` for a 1-D tensor ``v`` of length ``dim``."""
        ...


class MatrixOperator:
    """A dense symmetric matrix as a :class:`LinearOperator`."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"need a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Av`."""
        return self.matrix @ v
