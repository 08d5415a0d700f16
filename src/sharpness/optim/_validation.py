"""Argument checks shared by the optimizers: one clear message per mistake."""

from __future__ import annotations

import math


def check_rho(rho: float, where: str = "rho") -> float:
    if isinstance(rho, bool) or not isinstance(rho, int | float):
        raise TypeError(f"{where} must be a float, got {type(rho).__name__}")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {rho}")
    return float(rho)


def check_p(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float):
        raise TypeError(f"p must be a float in (1, inf], got {type(p).__name__}")
    if math.isnan(p) or p < 1:
        raise ValueError(f"p must be in (1, inf], got {p}")
    if p == 1:
        raise ValueError(
            "p = 1 is not supported: the l1 ball's maximiser is not unique (eq. 2 degenerates to q = inf); "
            "use p = 2 (default) or p = math.inf"
        )
    return float(p)


def check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_probability(value: float, name: str) -> float:
    """A number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_nonnegative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
