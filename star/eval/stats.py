"""The two intervals every accuracy table here needs: one accuracy, and the difference of two settings that
answered the same questions."""

from __future__ import annotations

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
