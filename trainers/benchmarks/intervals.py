"""95 % intervals for a handful of seeds, without scipy: a mean's Student-t interval and Welch's
interval for a difference of two means (unequal variances, Welch–Satterthwaite degrees of
freedom). Student's t quantile is found by bisection on its CDF, the CDF by Simpson's rule on
the density (exact to about 1e-7 for the degrees of freedom and quantiles used here)."""
from __future__ import annotations

import math
import statistics

LEVEL = 0.95


def _t_density(x: float, df: float) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: float, intervals: int = 2000) -> float:
    """P(T ≤ x) for Student's t with ``df`` degrees of freedom (x ≥ 0: Simpson on [0, x])."""
    if x < 0:
        return 1.0 - t_cdf(-x, df, intervals)
    h = x / intervals
    total = _t_density(0.0, df) + _t_density(x, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, intervals))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: float) -> float:
    """The x with P(T ≤ x) = p, for p in (0.5, 1)."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95 % Student-t interval); half-width NaN for one value, both
    NaN if a value is (a diverged run)."""
    if not all(math.isfinite(v) for v in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, t_quantile((1 + LEVEL) / 2, len(values) - 1) * sem


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean(a) − mean(b), half-width of Welch's 95 % interval for it); NaN with < 2 values."""
    if not all(math.isfinite(v) for v in (*a, *b)):
        return math.nan, math.nan
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return diff, 0.0
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return diff, t_quantile((1 + LEVEL) / 2, df) * math.sqrt(va + vb)


def significant(diff: float, half: float) -> bool:
    """Whether a 95 % interval diff ± half excludes 0."""
    return not math.isnan(half) and abs(diff) > half
