"""Aggregate statistics for comparing RL runs, after rliable (Agarwal et al., "Deep Reinforcement Learning at
the Edge of the Statistical Precipice", NeurIPS 2021).

Pure numpy. Scores are arrays whose axis 0 (``runs``) indexes independent runs (trials); *strata* label
each run with its task, and the stratified bootstrap resamples runs within each task independently,
keeping the number of runs per task fixed. Intervals are percentile intervals of the bootstrap
distribution (rliable's default). Every interval draws from a fresh ``numpy.random.default_rng(seed)``,
so a given (scores, statistic, reps, seed) always gives the same interval.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

# bootstrap samples are evaluated in chunks of about this many numbers, to bound memory
_CHUNK_ELEMENTS = 4_000_000


class Interval(NamedTuple):
    """A point estimate with the lower and upper ends of its confidence interval."""

    point: float
    lo: float
    hi: float


def iqm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% of scores (rliable's IQM, a 25% trimmed mean).

    Sorts along ``axis``, drops ``k = floor(0.25 n)`` scores at each end and averages the rest (the same
    convention as ``scipy.stats.trim_mean(x, 0.25)``): IQM(1..8) = mean(3, 4, 5, 6) = 4.5; for n < 4
    nothing is dropped and the IQM is the mean.
    """
    x = np.sort(np.asarray(x, dtype=float), axis=axis)
    n = x.shape[axis]
    k = int(0.25 * n)
    return np.take(x, np.arange(k, n - k), axis=axis).mean(axis=axis)


def auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Normalized area under a learning curve: the trapezoid integral over steps divided by the step range.

    AUC = (1 / (s_K - s_1)) * sum_k (s_{k+1} - s_k) (v_k + v_{k+1}) / 2, i.e. the average height of the
    piecewise-linear curve through the logged points, in the metric's units (a curve rising linearly from
    0 to 1 has AUC 0.5). Points are sorted by step and NaN values dropped; a single point gives its value.
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError(f"steps and values must be 1-D of one length, got {s.shape} and {v.shape}")
    keep = np.isfinite(s) & np.isfinite(v)
    s, v = s[keep], v[keep]
    if s.size == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    span = s[-1] - s[0]
    if span == 0:
        return float(v.mean())
    return float(np.sum(np.diff(s) * (v[1:] + v[:-1]) / 2.0) / span)


def probability_of_improvement(x: np.ndarray, y: np.ndarray, x_strata: Optional[Sequence] = None,
                               y_strata: Optional[Sequence] = None) -> float:
    """P(X > Y): the chance that a run of X scores higher than a run of Y (rliable's probability of improvement).

    Per task, the Mann-Whitney statistic over all run pairs: P = (1 / (n m)) sum_i sum_j S(x_i, y_j) with
    S = 1 if x_i > y_j, 1/2 if x_i = y_j, 0 otherwise; with strata the result is the average over the tasks
    both groups have (NaN when they share none). Identical groups give 0.5, a dominating group 1.0.
    """
    xc, yc = _pair_codes(x_strata, y_strata, len(x), len(y))
    return float(_poi_batched(np.asarray(x, float)[None], np.asarray(y, float)[None], xc, yc)[0])


def bootstrap_ci(x: np.ndarray, stat: Callable[..., np.ndarray] = np.mean, reps: int = 2000, seed: int = 0,
                 strata: Optional[Sequence] = None, level: float = 0.95) -> Interval:
    """Stratified bootstrap percentile interval of ``stat`` over runs (rliable's StratifiedBootstrap).

    ``x`` has runs on axis 0 (shape [n] or [n, ...], e.g. [n, G] learning curves on a grid of G steps).
    ``stat(samples, axis=1)`` reduces samples of shape [B, n, ...] over runs (``np.mean``, ``np.median``,
    :func:`iqm`). Each of ``reps`` resamples draws n runs with replacement, within each stratum when
    ``strata`` labels the runs; the interval is the (1-level)/2 and (1+level)/2 percentiles of the
    resampled statistic, and the point is ``stat`` of ``x`` itself (floats for 1-D ``x``, arrays over
    the trailing axes otherwise).
    """
    x = np.asarray(x, dtype=float)
    _check_sample(x, reps, level)
    codes = _codes(strata, len(x))
    point = np.asarray(stat(x[None], axis=1))[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, x.size))
    boot = []
    for start in range(0, reps, chunk):
        idx = resample_indices(codes, min(chunk, reps - start), rng)
        boot.append(np.asarray(stat(x[idx], axis=1)))
    return _interval(point, np.concatenate(boot, axis=0), level)


def probability_of_improvement_ci(x: np.ndarray, y: np.ndarray, reps: int = 2000, seed: int = 0,
                                  x_strata: Optional[Sequence] = None, y_strata: Optional[Sequence] = None,
                                  level: float = 0.95) -> Interval:
    """:func:`probability_of_improvement` with a bootstrap interval; X's and Y's runs are resampled
    independently, each within its strata (rliable's StratifiedIndependentBootstrap)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _check_sample(x, reps, level)
    _check_sample(y, reps, level)
    xc, yc = _pair_codes(x_strata, y_strata, len(x), len(y))
    point = _poi_batched(x[None], y[None], xc, yc)[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, x.size * y.size))
    boot = []
    for start in range(0, reps, chunk):
        b = min(chunk, reps - start)
        xi, yi = resample_indices(xc, b, rng), resample_indices(yc, b, rng)
        boot.append(_poi_batched(x[xi], y[yi], xc, yc))
    return _interval(point, np.concatenate(boot), level)


def resample_indices(codes: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap index matrix [reps, n] for n runs with integer stratum ``codes``: row b lists resample b.

    The positions of each stratum are refilled with draws (with replacement) from that stratum only, so
    every resample keeps the strata sizes of the original sample; one stratum is the plain bootstrap.
    """
    idx = np.empty((reps, len(codes)), dtype=np.int64)
    for c in np.unique(codes):
        members = np.flatnonzero(codes == c)
        idx[:, members] = members[rng.integers(0, len(members), size=(reps, len(members)))]
    return idx


# --------------------------------------------------------------------------------------------- helpers

def _check_sample(x: np.ndarray, reps: int, level: float) -> None:
    if x.ndim == 0 or len(x) == 0:
        raise ValueError("need at least one run")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _codes(strata: Optional[Sequence], n: int) -> np.ndarray:
    """Integer stratum codes for n runs (all zero without strata)."""
    if strata is None:
        return np.zeros(n, dtype=np.int64)
    labels = [_hashable(s) for s in strata]
    if len(labels) != n:
        raise ValueError(f"strata has {len(labels)} labels for {n} runs")
    index = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
    return np.array([index[lab] for lab in labels], dtype=np.int64)


def _pair_codes(x_strata, y_strata, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratum codes for two groups of runs, the same task label getting the same code in both."""
    codes = _codes(None if x_strata is None and y_strata is None else
                   list(x_strata if x_strata is not None else [None] * n)
                   + list(y_strata if y_strata is not None else [None] * m), n + m)
    return codes[:n], codes[n:]


def _hashable(v):
    # NaN != NaN: map every missing label to None so the runs without a task form one stratum
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def _poi_batched(x: np.ndarray, y: np.ndarray, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
    """P(X > Y) per batch row for x [B, n], y [B, m]; averaged over the tasks (codes) both groups have."""
    per_task = []
    for c in np.intersect1d(xc, yc):
        xs, ys = x[:, xc == c][:, :, None], y[:, yc == c][:, None, :]
        # S(x_i, y_j) = 1[x_i > y_j] + 0.5 * 1[x_i = y_j], averaged over all n*m pairs
        per_task.append(((xs > ys) + 0.5 * (xs == ys)).mean(axis=(1, 2)))
    if not per_task:
        return np.full(len(x), np.nan)
    return np.mean(per_task, axis=0)


def _interval(point: np.ndarray, boot: np.ndarray, level: float):
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=0)
    if np.ndim(point) == 0:
        return Interval(float(point), float(lo), float(hi))
    return Interval(point, lo, hi)
