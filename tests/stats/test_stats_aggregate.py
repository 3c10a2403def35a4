"""offrl.stats.aggregate: IQM, AUC, probability of improvement and the stratified bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from offrl.stats.aggregate import (auc, bootstrap_ci, iqm, probability_of_improvement,
                                   probability_of_improvement_ci, resample_indices)


def test_iqm_by_hand():
    # 1..8: drop floor(0.25 * 8) = 2 scores at each end -> mean(3, 4, 5, 6) = 18 / 4 = 4.5
    assert iqm(np.arange(1, 9)) == pytest.approx(4.5)
    # order does not matter; 1..10: drop 2 at each end -> mean(3..8) = 33 / 6 = 5.5
    assert iqm(np.array([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])) == pytest.approx(5.5)
    # an outlier in the outer quartiles does not move it: mean(3, 4, 5, 6) again
    assert iqm([1, 2, 3, 4, 5, 6, 7, 1e9]) == pytest.approx(4.5)
    # fewer than 4 scores: nothing is trimmed
    assert iqm([1.0, 2.0, 6.0]) == pytest.approx(3.0)
    # along an axis: rows 1..8 and 11..18
    np.testing.assert_allclose(iqm(np.stack([np.arange(1, 9), np.arange(11, 19)]), axis=1), [4.5, 14.5])


def test_auc_of_known_curves():
    # a line from 0 to 1 has average height 1/2, whatever the step range
    assert auc([0, 100, 200, 300, 400], [0, 0.25, 0.5, 0.75, 1.0]) == pytest.approx(0.5)
    assert auc([1000, 3000], [0.0, 1.0]) == pytest.approx(0.5)
    # constant curve: its value
    assert auc([0, 5, 7], [0.3, 0.3, 0.3]) == pytest.approx(0.3)
    # by hand: steps 0, 1, 3 and values 0, 2, 2: area 1 * (0 + 2) / 2 + 2 * (2 + 2) / 2 = 5, range 3 -> 5/3
    assert auc([0, 1, 3], [0, 2, 2]) == pytest.approx(5 / 3)
    # unsorted input and NaN (a step where the metric was not logged) are handled
    assert auc([3, 0, 2, 1], [2, 0, np.nan, 2]) == pytest.approx(5 / 3)
    assert auc([7], [0.4]) == pytest.approx(0.4)
    assert np.isnan(auc([], []))


def test_probability_of_improvement():
    x = np.array([0.1, 0.5, 0.9, 0.3])
    assert probability_of_improvement(x, x) == 0.5            # identical groups
    assert probability_of_improvement(x + 1, x) == 1.0        # X dominates
    assert probability_of_improvement(x, x + 1) == 0.0
    # by hand: x = (1, 2), y = (1, 0): pairs 1~1 -> 0.5, 1>0, 2>1, 2>0 -> 3.5 / 4
    assert probability_of_improvement([1, 2], [1, 0]) == pytest.approx(0.875)
    # with tasks: the average of per-task probabilities; task A: X wins (1), task B: Y wins (0) -> 0.5
    p = probability_of_improvement([5, 6, 0], [1, 1, 9], x_strata=["A", "A", "B"], y_strata=["A", "B", "B"])
    assert p == pytest.approx(0.5)


def test_probability_of_improvement_intervals():
    x = np.random.default_rng(1).normal(size=10)
    same = probability_of_improvement_ci(x, x, reps=300, seed=0)
    assert same.point == 0.5 and same.lo < 0.5 < same.hi
    dom = probability_of_improvement_ci(x + 100, x, reps=300, seed=0)
    assert dom == (1.0, 1.0, 1.0)


def test_bootstrap_interval_of_the_mean_covers_in_about_95_percent():
    # 200 samples of 20 draws from N(3, 1); the 95% percentile interval of the mean should cover 3 in
    # about 95% of them (percentile intervals run a little short at n = 20: ~93%)
    rng = np.random.default_rng(123)
    covered = 0
    for i in range(200):
        sample = rng.normal(3.0, 1.0, size=20)
        ci = bootstrap_ci(sample, np.mean, reps=300, seed=i)
        assert ci.lo <= ci.point <= ci.hi
        covered += ci.lo <= 3.0 <= ci.hi
    assert 0.88 <= covered / 200 <= 0.99


def test_stratified_bootstrap_keeps_tasks_apart():
    # task A scores 0 (3 runs), task B scores 10 (2 runs): every stratified resample keeps 3 A and 2 B runs,
    # so its mean is always (0 * 3 + 10 * 2) / 5 = 4 -> a zero-width interval; unstratified it varies
    x = np.array([0.0, 10.0, 0.0, 10.0, 0.0])
    strata = ["A", "B", "A", "B", "A"]
    assert bootstrap_ci(x, np.mean, reps=500, seed=0, strata=strata) == (4.0, 4.0, 4.0)
    plain = bootstrap_ci(x, np.mean, reps=500, seed=0)
    assert plain.lo < 4.0 < plain.hi
    idx = resample_indices(np.array([0, 1, 0, 1, 0]), 50, np.random.default_rng(0))
    assert idx.shape == (50, 5) and np.all(np.isin(idx[:, [0, 2, 4]], [0, 2, 4])) and np.all(np.isin(idx[:, [1, 3]], [1, 3]))


def test_bootstrap_is_deterministic_and_handles_curves():
    x = np.random.default_rng(2).normal(size=15)
    assert bootstrap_ci(x, iqm, reps=200, seed=7) == bootstrap_ci(x, iqm, reps=200, seed=7)
    assert bootstrap_ci(x, iqm, reps=200, seed=7) != bootstrap_ci(x, iqm, reps=200, seed=8)
    curves = np.random.default_rng(3).normal(size=(6, 40))  # 6 runs on a grid of 40 steps
    mean, lo, hi = bootstrap_ci(curves, np.mean, reps=100, seed=0)
    assert mean.shape == lo.shape == hi.shape == (40,)
    np.testing.assert_allclose(mean, curves.mean(axis=0))
    assert np.all(lo <= mean) and np.all(mean <= hi)
    # the per-step interval is the one a 1-D bootstrap of that step's column gives (same resamples)
    assert (lo[5], hi[5]) == pytest.approx(bootstrap_ci(curves[:, 5], np.mean, reps=100, seed=0)[1:])


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]), np.mean)
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([1.0]), np.mean, reps=0)
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([1.0, 2.0]), np.mean, strata=["A"])
