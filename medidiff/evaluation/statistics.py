"""Uncertainty for evaluation numbers: bootstrap CIs, paired tests against a baseline, Wilson intervals.

Every :class:`Interval` names the assumption behind it (``method``). With fewer than :data:`MIN_CASES`
values a bootstrap CI and a Wilcoxon p-value say nothing useful (too few distinct resamples; p can
never fall below 0.05): they are NaN and print as ``n/a``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_SEED = 20240601
DEFAULT_RESAMPLES = 2000
MIN_CASES = 6
BOOTSTRAP = "percentile bootstrap over cases (cases independent)"
WILSON = "Wilson score (judgments independent)"


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval."""

    estimate: float
    low: float
    high: float
    method: str = BOOTSTRAP

    @property
    def defined(self) -> bool:
        """False when there were too few values for an interval."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    def __str__(self) -> str:
        bounds = f"{self.low:.4g}, {self.high:.4g}" if self.defined else "n/a"
        return f"{self.estimate:.4g} [{bounds}]"


@dataclass(frozen=True)
class PairedTest:
    """Method minus baseline, per case: mean difference with its bootstrap CI, and the Wilcoxon p-value."""

    difference: Interval
    p_value: float
    n: int

    @property
    def p_text(self) -> str:
        """The p-value to print: ``n/a`` with too few cases."""
        return f"{self.p_value:.3g}" if np.isfinite(self.p_value) else "n/a"


def bootstrap_ci(
    values, *, confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> Interval:
    """Percentile bootstrap CI of the mean (``scipy.stats.bootstrap``); deterministic for a given ``seed``.

    Fewer than :data:`MIN_CASES` values: NaN bounds (``n/a``). Identical values give a zero-width CI.
    """
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of values")
    mean = float(data.mean())
    if data.size < MIN_CASES:
        return Interval(mean, float("nan"), float("nan"))
    if np.all(data == data[0]):
        return Interval(mean, mean, mean)
    ci = bootstrap((data,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                   rng=np.random.default_rng(seed)).confidence_interval
    return Interval(mean, float(ci.low), float(ci.high))


def paired_test(
    values, baseline, *, confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> PairedTest:
    """Paired comparison of per-case ``values`` with ``baseline`` (same cases, same order).

    The CI is a bootstrap over cases of the mean difference; the p-value is the two-sided Wilcoxon
    signed-rank test (1.0 when every difference is zero, NaN with fewer than :data:`MIN_CASES` cases).
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_test needs as many baseline values as values ({b.shape} vs {a.shape})")
    diff = a - b
    interval = bootstrap_ci(diff, confidence=confidence, n_resamples=n_resamples, seed=seed)
    if diff.size < MIN_CASES:
        p_value = float("nan")
    else:
        p_value = 1.0 if not np.any(diff) else float(wilcoxon(diff).pvalue)
    return PairedTest(interval, p_value, int(diff.size))


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion (well behaved at 0, 1 and small n; ``scipy.stats.binomtest``)."""
    from scipy.stats import binomtest

    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high), WILSON)
