"""The intervals behind every accuracy and speed table: known values, symmetry, the large-sample limit, and coverage."""

import math
import random
import statistics

import pytest

from star.eval.stats import mean_interval, paired_difference, student_t_quantile, wilson_interval


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


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_student_t_quantile_matches_the_closed_forms(p):
    """Student's t has closed-form quantiles at 1 degree of freedom (Cauchy) and at 2; larger df tend to the
    normal's."""
    assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)
    assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-6)
    assert student_t_quantile(p, 100_000) == pytest.approx(statistics.NormalDist().inv_cdf(p), rel=1e-4)
    assert student_t_quantile(p, 3) > student_t_quantile(p, 10) > student_t_quantile(p, 100_000)


def test_mean_interval_is_the_t_interval():
    values = [0.90, 0.95, 0.92, 0.88]
    mean, (low, high) = mean_interval(values)
    half = 3.182446 * statistics.stdev(values) / 2  # t(0.975, 3) from a printed table; sqrt(4) = 2
    assert mean == pytest.approx(0.9125)
    assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-6)
    assert mean_interval([1.0, 1.0, 1.0])[1] == [1.0, 1.0]
    with pytest.raises(ValueError, match="at least two values, got 1"):
        mean_interval([0.9])


def test_mean_interval_covers_the_true_mean_at_small_samples():
    """Five normal draws at a time: the t interval holds the true mean about 95% of the time (the normal's z
    interval would hold it about 88%)."""
    rng = random.Random(0)
    trials = 2000
    covered = 0
    for _ in range(trials):
        low, high = mean_interval([rng.gauss(1.0, 0.05) for _ in range(5)])[1]
        covered += low <= 1.0 <= high
    assert 0.935 <= covered / trials <= 0.965
