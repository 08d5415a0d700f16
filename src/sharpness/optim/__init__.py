"""Sharpness-aware optimizers and the pure functions they are built from.

:class:`SAM` is the engine: every variant is a short subclass that changes where it perturbs (the direction eq. 2
normalises), when it runs the ascent pass, or how it forms the final gradient.
"""

from sharpness.optim.esam import ESAM
from sharpness.optim.friendly_sam import FriendlySAM
from sharpness.optim.gsam import GSAM
from sharpness.optim.interval import AESAM, IntervalSAM, StochasticSAM
from sharpness.optim.looksam import LookSAM
from sharpness.optim.msam import MSAM
from sharpness.optim.perturbation import Perturbation, adaptive_scale, dual_exponent, global_norm, perturbation
from sharpness.optim.random_direction import RandomDirectionSAM
from sharpness.optim.sam import SAM
from sharpness.optim.vasso import VaSSO

__all__ = [
    "SAM",
    "GSAM",
    "LookSAM",
    "MSAM",
    "ESAM",
    "FriendlySAM",
    "VaSSO",
    "RandomDirectionSAM",
    "IntervalSAM",
    "StochasticSAM",
    "AESAM",
    "Perturbation",
    "adaptive_scale",
    "dual_exponent",
    "global_norm",
    "perturbation",
]
