r"""Hessian trace by Hutchinson's estimator, stopped by a confidence interval.

For Rademacher vectors :math:`z` (i.i.d. :math:`\pm1` entries), :math:`\mathbb{E}[z^\top H z] =
\operatorname{tr} H` with variance :math:`2\sum_{i\ne j} H_{ij}^2` (Hutchinson 1990; the
Rademacher choice has the smallest variance among i.i.d. entry distributions). After :math:`k`
samples with mean :math:`\bar x` and standard deviation :math:`s`, the Student-t interval

.. math::
    \bar x \pm t_{(1+c)/2,\,k-1}\, s / \sqrt{k}

has confidence :math:`c` for a fixed :math:`k` (asymptotically, by the central limit theorem).
Sampling stops once its relative half-width is at most ``rtol`` (after ``min_samples``, so that
:math:`s` is itself reliable), or at ``max_samples``; ``converged`` says which happened.
Stopping on the interval, not on the change of the running mean, is what makes the reported
error bar mean something; the data-dependent stop costs a little coverage, which
``min_samples`` keeps small.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from scipy.stats import t as student_t

from sharpness.analysis.operators import LinearOperator
from sharpness.analysis.probes import probe_generator, random_vector
from sharpness.analysis.progress import progress_bar

__all__ = ["TraceEstimate", "hutchinson_trace"]


class TraceEstimate(NamedTuple):
    """Outcome of :func:`hutchinson_trace`."""

    estimate: float
    ci_low: float
    ci_high: float
    stderr: float
    """:math:`s/\\sqrt k`."""
    confidence: float
    num_samples: int
    converged: bool
    """Whether the relative half-width reached ``rtol`` before ``max_samples``."""
    samples: list[float]


def hutchinson_trace(
    op: LinearOperator,
    *,
    rtol: float = 0.05,
    confidence: float = 0.95,
    min_samples: int = 10,
    max_samples: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> TraceEstimate:
    """Estimate :math:`\\operatorname{tr}(H)` with a Student-t confidence interval.

    Args:
        op: a symmetric operator.
        rtol: stop when the interval's half-width is at most ``rtol * |estimate|``.
        confidence: level :math:`c` of the interval.
        min_samples: samples drawn before the stopping rule is consulted (at least 2).
        max_samples: hard limit on samples (= operator products).
        seed: seed of the Rademacher vectors (drawn on the operator's device in its dtype,
            :mod:`sharpness.analysis.probes`).
        progress: show a progress bar.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    min_samples = max(2, int(min_samples))
    if max_samples < min_samples:
        raise ValueError(f"max_samples ({max_samples}) < min_samples ({min_samples})")
    gen = probe_generator(seed, op.device)
    samples: list[float] = []
    mean = half = stderr = 0.0
    converged = False
    for k in progress_bar(range(1, max_samples + 1), desc="hutchinson", enabled=progress):
        z = random_vector(op.dim, gen, distribution="rademacher", dtype=op.dtype)
        samples.append(float(torch.dot(z, op.matvec(z))))
        if k < 2:
            continue
        x = torch.tensor(samples, dtype=torch.float64)
        mean = float(x.mean())
        stderr = float(x.std(unbiased=True)) / math.sqrt(k)
        half = float(student_t.ppf(0.5 + confidence / 2, k - 1)) * stderr
        if k >= min_samples and half <= rtol * abs(mean):
            converged = True
            break
    if len(samples) == 1:
        mean, stderr, half = samples[0], math.inf, math.inf
    return TraceEstimate(mean, mean - half, mean + half, stderr, confidence, len(samples), converged, samples)
