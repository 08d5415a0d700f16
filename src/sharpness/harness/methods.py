"""The training methods a config can name: the base optimizer alone, SAM, and each variant with its config keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer

import sharpness
from sharpness.harness.config import TrainConfig
from sharpness.harness.seeds import epoch_seed

__all__ = ["METHODS", "Method", "method_options"]


@dataclass(frozen=True)
class Method:
    optimizer: type[sharpness.SAM]
    options: Callable[[TrainConfig, int], dict[str, Any]]
    """The optimizer's own options from the config and the run's total number of steps."""


METHODS: dict[str, Method] = {
    "sam": Method(sharpness.SAM, lambda c, n: {"ascent_steps": c.ascent_steps, "second_order": c.second_order}),
    "gsam": Method(sharpness.GSAM, lambda c, n: {"alpha": c.gsam_alpha, "rho_min": c.rho_min}),
    "looksam": Method(sharpness.LookSAM, lambda c, n: {"k": c.looksam_k, "alpha": c.looksam_alpha}),
    "msam": Method(sharpness.MSAM, lambda c, n: {}),
    "esam": Method(sharpness.ESAM, lambda c, n: {"beta": c.esam_beta, "gamma": c.esam_gamma, "seed": _seed(c)}),
    "fsam": Method(sharpness.FriendlySAM, lambda c, n: {"sigma": c.fsam_sigma, "lmbda": c.fsam_lambda}),
    "vasso": Method(sharpness.VaSSO, lambda c, n: {"theta": c.vasso_theta}),
    "interval": Method(sharpness.IntervalSAM, lambda c, n: {"k": c.interval_k}),
    "stochastic": Method(sharpness.StochasticSAM, lambda c, n: {"probability": c.sam_probability, "seed": _seed(c)}),
    "aesam": Method(
        sharpness.AESAM,
        lambda c, n: {"c_start": c.aesam_c_start, "c_end": c.aesam_c_end, "decay": c.aesam_decay, "total_steps": n},
    ),
    "random": Method(sharpness.RandomDirectionSAM, lambda c, n: {"seed": _seed(c)}),
}
"""``method:`` names other than ``sgd`` (the base optimizer alone)."""


def _seed(config: TrainConfig) -> int:
    return epoch_seed(config.seed, 0, "optimizer")


def method_options(config: TrainConfig, total_steps: int) -> tuple[type[Optimizer], dict[str, Any]]:
    """The optimizer class of ``config.method`` and its own options."""
    method = METHODS[config.method]
    return method.optimizer, method.options(config, total_steps)
