"""When a variant runs the ascent pass: every k steps, with probability p, or when the gradient is unusually large.

Each schedule is a small object with explicit state (``state_dict`` / ``load_state_dict``): the optimizer asks it
once per step and saves its state with its own. Steps that do not ascend are plain base-optimizer steps on the
clean gradient, one pass instead of two.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sharpness.optim._validation import check_positive_int, check_probability

__all__ = ["Every", "WithProbability", "GradientOutlier"]


class Every:
    """Ascend on steps ``0, k, 2k, ...`` (counting every step from 0): Composer's ``interval``, LookSAM's ``k``."""

    def __init__(self, k: int) -> None:
        self.k = check_positive_int(k, "k")

    def ascends(self, step: int) -> bool:
        return step % self.k == 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class WithProbability:
    """Ascend on each step with probability ``p``, drawn from a generator of its own (saved with the optimizer).

    The draw for a step is made once, when first asked, so a data-parallel loop can ask before the clean pass
    whether to run it under ``no_sync()`` and the step then does what it was told.
    """

    def __init__(self, p: float, seed: int | None = None) -> None:
        self.p = check_probability(p, "probability")
        if seed is None:  # follows torch.manual_seed, like any other torch randomness
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        self.generator = torch.Generator().manual_seed(int(seed))
        self._drawn: tuple[int, bool] | None = None

    def ascends(self, step: int) -> bool:
        if self._drawn is None or self._drawn[0] != step:
            self._drawn = (step, bool(torch.rand((), generator=self.generator).item() < self.p))
        return self._drawn[1]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "drawn": list(self._drawn) if self._drawn else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._drawn = (int(state["drawn"][0]), bool(state["drawn"][1])) if state.get("drawn") else None


class GradientOutlier:
    r"""AE-SAM's rule (Jiang et al., 2023, eq. 6): ascend when :math:`\|g_t\|^2 \ge \mu_t + c_t \sigma_t`.

    :math:`\mu_t = \delta\mu_{t-1} + (1-\delta)\|g_t\|^2` and
    :math:`\sigma^2_t = \delta\sigma^2_{t-1} + (1-\delta)(\|g_t\|^2 - \mu_t)^2` are exponential moving averages of
    the squared clean-gradient norm, updated before the comparison, and :math:`c_t` moves linearly from ``c_start``
    to ``c_end`` over ``total_steps`` (constant ``c_start`` when ``total_steps`` is None).
    """

    def __init__(
        self, c_start: float, c_end: float | None = None, decay: float = 0.9, total_steps: int | None = None
    ) -> None:
        for name, value in (("c_start", c_start), ("c_end", c_start if c_end is None else c_end)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        self.c_start = float(c_start)
        self.c_end = float(c_start if c_end is None else c_end)
        self.decay = check_probability(decay, "decay")
        self.total_steps = None if total_steps is None else check_positive_int(total_steps, "total_steps")
        self.mean = 0.0
        self.var = 0.0
        self.seen = 0

    def threshold(self, step: int) -> float:
        if self.total_steps is None:
            return self.c_start
        fraction = min(1.0, step / self.total_steps)
        return self.c_start + (self.c_end - self.c_start) * fraction

    def ascends(self, step: int, sq_norm: float) -> bool:
        """Update the moving averages with a finite ``sq_norm`` and compare (a non-finite one ascends, changing
        nothing: the step is skipped anyway)."""
        if not math.isfinite(sq_norm):
            return True
        d = self.decay
        if self.seen == 0:
            mean, var = sq_norm, 0.0
        else:
            mean = d * self.mean + (1 - d) * sq_norm
            var = d * self.var + (1 - d) * (sq_norm - mean) ** 2
        self.mean, self.var, self.seen = mean, var, self.seen + 1
        return sq_norm >= mean + self.threshold(step) * math.sqrt(var)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.seen = float(state["mean"]), float(state["var"]), int(state["seen"])
