"""Sharpness-aware optimizers and the pure functions they are built from."""

from sharpness.optim.perturbation import Perturbation, adaptive_scale, dual_exponent, global_norm, perturbation
from sharpness.optim.sam import SAM

__all__ = ["SAM", "Perturbation", "adaptive_scale", "dual_exponent", "global_norm", "perturbation"]
