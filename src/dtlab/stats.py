"""The numbers a report states, in plain NumPy (tests/test_report.py checks each against
rliable or scipy where they compute the same quantity): the D4RL normalized score; per group
of runs the mean's 95% Student-t CI (a percentile bootstrap over 3 runs is their [min, max]);
across tasks, as Agarwal et al. 2021 ("Deep RL at the Edge of the Statistical Precipice", the
rliable library), the interquartile mean (IQM) with a stratified-bootstrap CI (runs resampled
within each task) and the probability of improvement of one algorithm over another; and
return calibration: Spearman's rank correlation and the least-squares slope of achieved
against target return.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

BOOTSTRAP_REPS = 10_000
CI = 0.95
# Every interval says its method (tables, figures, JSON): over a cell's runs the t interval,
# across tasks rliable's stratified bootstrap
CI_METHOD = "95% t-CI"  # mean +- t(0.975, n - 1) * std / sqrt(n), over runs (seeds)
BOOTSTRAP_METHOD = "95% stratified-bootstrap CI"  # percentile, 10,000 resamples of runs within each task


def normalized_score(returns: np.ndarray | float, reference: Mapping | Sequence[float]) -> np.ndarray | float:
    """D4RL-normalized score: 100 * (R - R_random) / (R_expert - R_random). `reference`: an env
    config (its ref_min_score and ref_max_score) or the pair (R_random, R_expert), as the data
    config and run records hold it."""
    if isinstance(reference, Mapping):
        reference = (reference["ref_min_score"], reference["ref_max_score"])
    low, high = reference
    return 100.0 * (returns - low) / (high - low)


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (scipy.stats.trim_mean(x, 0.25))."""
    x = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    cut = int(0.25 * len(x))
    return float(x[cut : len(x) - cut].mean())


def bootstrap_ci(
    tasks: Sequence[np.ndarray], statistic: Callable[[list[np.ndarray]], float], seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of `statistic` under stratified bootstrap: each task's runs are resampled
    with replacement, independently of the other tasks'. One task: the plain bootstrap."""
    rng = np.random.default_rng(seed)
    stats = np.empty(BOOTSTRAP_REPS)
    for i in range(BOOTSTRAP_REPS):
        stats[i] = statistic([t[rng.integers(0, len(t), len(t))] for t in tasks])
    alpha = (1 - CI) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with integer `df` degrees of freedom, by bisection
    on its CDF, which has a closed form for integer df (Abramowitz and Stegun 26.7.3-4): NumPy
    only, exact to float precision (tests/test_report.py checks it against scipy)."""
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < p < 1, not df={df}, p={p}")

    def central(t: float) -> float:  # P(|T| < t)
        theta = math.atan(t / math.sqrt(df))
        c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
        if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...))
            for k in range(1, (df - 1) // 2):
                term *= c2 * 2 * k / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
        for k in range(1, df // 2):  # even: sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    lo, hi = 0.0, 1.0
    while central(hi) < 2 * p - 1:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < 2 * p - 1 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(scores: np.ndarray) -> tuple[np.ndarray | float, np.ndarray | float]:
    """The Student-t CI (CI_METHOD) of the mean over runs, along the last axis (vectorized:
    the report computes one for every group and figure point, the coverage test for thousands of
    groups at once); NaN with fewer than 2 runs. At 3 runs a percentile bootstrap of the mean is
    the runs' [min, max] (each run resampled 3 times has probability 1/27 > 2.5%) and covers
    ~75%; the t interval holds its level at any n when the runs' scores are near normal."""
    x = np.asarray(scores, dtype=np.float64)
    n = x.shape[-1]
    if n < 2:
        nan = np.full(x.shape[:-1], np.nan)
        return (float(nan), float(nan)) if nan.ndim == 0 else (nan, nan)
    mean = x.mean(axis=-1)
    half = t_quantile(1 - (1 - CI) / 2, n - 1) * x.std(axis=-1, ddof=1) / math.sqrt(n)
    low, high = mean - half, mean + half
    return (float(low), float(high)) if np.ndim(low) == 0 else (low, high)


def probability_of_improvement(x: Sequence[np.ndarray], y: Sequence[np.ndarray]) -> float:
    """P(X > Y): per task the probability that a run of X beats a run of Y (ties count half,
    the Mann-Whitney U over n * m), averaged over tasks."""
    per_task = []
    for xs, ys in zip(x, y, strict=True):
        diff = np.asarray(xs, dtype=np.float64)[:, None] - np.asarray(ys, dtype=np.float64)[None, :]
        per_task.append(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)
    return float(np.mean(per_task))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation; None with fewer than 3 points or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Least-squares slope of y on x; None with fewer than 2 distinct x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 2:
        return None
    return float(np.polyfit(x, y, 1)[0])


def calibration(summary: Sequence[dict], data_range: Sequence[float] | None) -> dict:
    """Does the achieved return follow the target? Over one run's final targets."""
    targets = [s["target"] for s in summary]
    achieved = [s["return_mean"] for s in summary]
    lo, hi = data_range if data_range else (math.inf, -math.inf)
    inside = [(t, a) for t, a in zip(targets, achieved, strict=True) if lo <= t <= hi]
    return {"spearman": spearman(targets, achieved), "slope": slope(*zip(*inside, strict=True)) if inside else None}
