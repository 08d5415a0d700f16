"""Sharpness-Aware Minimization for PyTorch (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021).

The core library (:mod:`sharpness.optim`, :mod:`sharpness.analysis`) depends on PyTorch alone;
the experiment harness (:mod:`sharpness.harness`) and the CLI (:mod:`sharpness.cli`) build on it.
"""

from sharpness.optim import (
    AESAM,
    ESAM,
    GSAM,
    MSAM,
    SAM,
    FriendlySAM,
    IntervalSAM,
    LookSAM,
    RandomDirectionSAM,
    StochasticSAM,
    VaSSO,
    adaptive_scale,
    dual_exponent,
    global_norm,
    perturbation,
)

__version__ = "0.1.0"
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
    "adaptive_scale",
    "dual_exponent",
    "global_norm",
    "perturbation",
    "__version__",
]
