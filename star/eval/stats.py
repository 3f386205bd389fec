"""The intervals the tables here need: one accuracy, the difference of two settings that answered the same
questions, and the mean of a few measurements (a speed ratio over repeated runs)."""

from __future__ import annotations

import math
import statistics
from functools import cache

Z95 = 1.959964


def wilson_interval(correct: int, n: int, z: float = Z95) -> list[float] | None:
    """The 95% Wilson score interval of an accuracy of `correct` out of `n` (None when n = 0): unlike the normal
    approximation it stays inside [0, 1] and is honest at small n and at accuracies near 0 or 1."""
    if n == 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))]  # rounding must not exclude p


def paired_difference(first: list[bool], second: list[bool], z: float = Z95) -> tuple[float, list[float]]:
    """Accuracy of `first` minus that of `second` on the same questions, with its 95% interval (Newcombe 1998,
    method 10: the two Wilson intervals combined through the correlation of the paired answers).

    Why paired: two methods asked the same questions agree on most of them, so their difference is far surer
    than two overlapping accuracy intervals suggest; only the questions one gets right and the other wrong
    count. Two settings that agree on every question still get an interval of nonzero width."""
    if len(first) != len(second) or not first:
        raise ValueError(f"paired_difference needs two equally long, non-empty answer lists, got {len(first)} and {len(second)}")
    n = len(first)
    both = sum(a and b for a, b in zip(first, second))
    only_first = sum(a and not b for a, b in zip(first, second))
    only_second = sum(b and not a for a, b in zip(first, second))
    neither = n - both - only_first - only_second
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    (l1, u1), (l2, u2) = wilson_interval(both + only_first, n, z), wilson_interval(both + only_second, n, z)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    phi = (both * neither - only_first * only_second) / margins**0.5 if margins else 0.0
    below = ((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2) ** 0.5
    above = ((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2) ** 0.5
    difference = p1 - p2
    return difference, [max(-1.0, difference - below), min(1.0, difference + above)]


@cache
def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile (p >= 0.5) of Student's t with `df` degrees of freedom: its distribution function, the
    integral of the density (Simpson's rule), inverted by bisection. No scipy here; good to 1e-6."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"student_t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, steps: int = 2000) -> float:  # x >= 0; an even number of steps
        h = x / steps
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return 0.5 + h / 3 * (density(0.0) + inner + density(x))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, list[float]]:
    """The mean of a few measurements with its Student t interval: for ratios of paired timings (a setting's burst
    over the unpruned one's on the same request), where a median alone hides how far runs scatter."""
    if len(values) < 2:
        raise ValueError(f"mean_interval needs at least two values, got {len(values)}")
    mean = statistics.fmean(values)
    half = student_t_quantile((1 + confidence) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, [mean - half, mean + half]
