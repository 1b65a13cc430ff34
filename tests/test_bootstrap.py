"""Paired bootstrap confidence intervals (sb3_textrl.metrics.bootstrap)."""

import numpy as np
import pytest

from sb3_textrl.metrics.bootstrap import format_interval, mean_interval, paired_bootstrap


def test_constant_difference_has_a_zero_width_interval():
    a = np.linspace(0.1, 0.9, 20)
    result = paired_bootstrap(a, a + 0.05)
    assert result.difference == pytest.approx(0.05)
    assert result.low == pytest.approx(0.05) and result.high == pytest.approx(0.05)
    assert result.significant and result.n == 20


def test_pairing_removes_item_difficulty():
    # Items differ a lot in difficulty, B is a little better on every item: paired, that is clearly significant,
    # though an unpaired comparison of the two means would drown in the spread of the items.
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0, 1, size=32)
    a = difficulty + rng.normal(0, 0.01, size=32)
    b = difficulty + 0.02 + rng.normal(0, 0.01, size=32)
    result = paired_bootstrap(a, b)
    assert result.significant and 0 < result.low < 0.02 < result.high
    assert abs(result.mean_b - result.mean_a - result.difference) < 1e-12


def test_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        a = rng.normal(0.3, 0.1, size=40)
        b = a + rng.normal(0.01, 0.05, size=40)
        result = paired_bootstrap(a, b, n_resamples=1000, seed=trial)
        covered += result.low <= 0.01 <= result.high
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_no_difference_is_not_significant_and_seed_reproducible():
    rng = np.random.default_rng(2)
    a = rng.uniform(size=50)
    b = a[::-1].copy()  # the same values, shuffled over the items: mean difference 0
    first, second = paired_bootstrap(a, b, seed=3), paired_bootstrap(a, b, seed=3)
    assert first == second
    assert not first.significant and first.low < 0 < first.high
    assert "CI" in str(first) and first.to_dict()["significant"] is False


def test_mean_interval_and_formatting():
    mean, low, high = mean_interval([0.2, 0.4, 0.6, 0.8])
    assert mean == pytest.approx(0.5) and 0.2 <= low < 0.5 < high <= 0.8
    assert format_interval(0.5, 0.25, 0.75) == "0.500 [0.250, 0.750]"
    assert format_interval(float("nan"), 0, 1) == "n/a"


@pytest.mark.parametrize(
    "a, b, kwargs, message",
    [
        ([0.1, 0.2], [0.1], {}, "same length"),
        ([0.1], [0.2], {}, "at least 2"),
        ([0.1, float("nan")], [0.2, 0.3], {}, "NaN"),
        ([0.1, 0.2], [0.2, 0.3], {"confidence": 95}, "confidence"),
        ([0.1, 0.2], [0.2, 0.3], {"n_resamples": 10}, "n_resamples"),
    ],
)
def test_bad_input_is_refused(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b, **kwargs)
