"""The intervals behind every accuracy table: known values, symmetry, the large-sample limit, and coverage."""

import random

import pytest

from star.eval.stats import paired_difference, wilson_interval


def test_wilson_interval_known_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) is None
    assert wilson_interval(4, 4)[1] == 1.0 and wilson_interval(0, 4)[0] == 0.0  # rounding never leaves p outside


def _answers(both, only_first, only_second, neither):
    first = [True] * both + [True] * only_first + [False] * only_second + [False] * neither
    second = [True] * both + [False] * only_first + [True] * only_second + [False] * neither
    return first, second


def test_paired_difference_swaps_sign():
    first, second = _answers(40, 9, 3, 8)
    difference, (low, high) = paired_difference(first, second)
    swapped, (swapped_low, swapped_high) = paired_difference(second, first)
    assert difference == pytest.approx(0.1) and swapped == pytest.approx(-0.1)
    assert (swapped_low, swapped_high) == pytest.approx((-high, -low))
    assert low < difference < high


def test_paired_difference_agreement_is_not_certainty():
    difference, (low, high) = paired_difference([True] * 50 + [False] * 10, [True] * 50 + [False] * 10)
    assert difference == 0 and low < -0.02 and high > 0.02


def test_paired_difference_large_sample_matches_the_normal_interval():
    n, only_first, only_second = 4000, 600, 400
    first, second = _answers(2000, only_first, only_second, n - 2000 - only_first - only_second)
    difference, (low, high) = paired_difference(first, second)
    variance = ((only_first + only_second) / n - difference**2) / n
    assert (high - low) / 2 == pytest.approx(1.959964 * variance**0.5, rel=0.02)


def test_paired_difference_covers_the_true_difference():
    """Correlated pairs at n = 60 (the tables' size): the interval holds the true difference about 95% of the time."""
    generator = random.Random(0)
    cells = {(True, True): 0.65, (True, False): 0.15, (False, True): 0.05, (False, False): 0.15}
    truth, trials, covered = 0.15 - 0.05, 2000, 0
    for _ in range(trials):
        pairs = generator.choices(list(cells), weights=list(cells.values()), k=60)
        _, (low, high) = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
        covered += low <= truth <= high
    assert 0.93 <= covered / trials <= 0.975


def test_paired_difference_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([True, False], [True])
