"""Expected validation performance: the exact order-statistics formula against brute-force enumeration
of every k-tuple of trials drawn with replacement."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from finetune.evp import curve, expected_max, with_failures


def brute_force(scores: list[float], k: int) -> tuple[float, float]:
    """Mean and std of max over all len(scores)**k equally likely draws with replacement."""
    maxima = [max(draw) for draw in itertools.product(scores, repeat=k)]
    mean = sum(maxima) / len(maxima)
    return mean, math.sqrt(sum((m - mean) ** 2 for m in maxima) / len(maxima))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_exact_formula_matches_enumeration(n, k):
    rng = np.random.default_rng(n * 10 + k)
    scores = [float(x) for x in rng.uniform(0.4, 0.9, size=n)]
    if n >= 3:
        scores[1] = scores[2]  # a tie
    mean, std = expected_max(scores, k)
    want_mean, want_std = brute_force(scores, k)
    assert mean == pytest.approx(want_mean, abs=1e-12)
    assert std == pytest.approx(want_std, abs=1e-9)


def test_the_curve_starts_at_the_mean_rises_and_tends_to_the_best():
    scores = [0.5, 0.7, 0.6, 0.9, 0.55, 0.8]
    points = curve(scores)
    assert [p["k"] for p in points] == [1, 2, 3, 4, 5, 6]
    assert points[0]["mean"] == pytest.approx(np.mean(scores)) and points[0]["std"] == pytest.approx(np.std(scores))
    means = [p["mean"] for p in points]
    assert all(b > a for a, b in zip(means, means[1:], strict=False))
    assert expected_max(scores, 500)[0] == pytest.approx(0.9, abs=1e-9)
    assert expected_max([0.7] * 4, 3) == (pytest.approx(0.7), pytest.approx(0.0, abs=1e-6))


def test_failed_trials_count_as_the_worst_finished_score():
    assert with_failures([0.6, None, 0.8, None]) == [0.6, 0.6, 0.8, 0.6]
    assert with_failures([None, None]) == []
    # a failure lowers the expectation at every k, as the worst trial would
    assert expected_max(with_failures([0.6, None, 0.8]), 2)[0] < expected_max([0.6, 0.8], 2)[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="no scores"):
        expected_max([], 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        expected_max([0.5], 0)
