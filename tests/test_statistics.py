"""Bootstrap CIs, paired tests and Wilson intervals behave as statistics should."""

import numpy as np
import pytest

from medidiff.evaluation.statistics import bootstrap_ci, paired_test, wilson_interval


def test_bootstrap_ci_covers_the_true_mean_most_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        sample = rng.normal(3.0, 2.0, size=30)
        ci = bootstrap_ci(sample, n_resamples=1000, seed=trial)
        covered += ci.low <= 3.0 <= ci.high
        assert ci.low <= sample.mean() <= ci.high
    assert 0.88 <= covered / 200 <= 0.99  # nominal 95 %; the percentile bootstrap is a little narrow at n=30


def test_bootstrap_ci_is_deterministic_with_a_seed():
    sample = np.random.default_rng(2).exponential(size=25)
    assert bootstrap_ci(sample, seed=7) == bootstrap_ci(sample, seed=7)
    assert bootstrap_ci(sample, seed=7) != bootstrap_ci(sample, seed=8)


def test_too_few_cases_give_no_interval_and_no_p_value():
    few = bootstrap_ci([2.5, 3.0, 1.0])
    assert few.estimate == pytest.approx(13 / 6) and not few.defined and str(few).endswith("[n/a]")
    test = paired_test([1.0, 2.0, 3.0], [0.0, 0.5, 1.0])
    assert test.p_text == "n/a" and not test.difference.defined
    assert bootstrap_ci([2.5] * 6).low == bootstrap_ci([2.5] * 6).high == 2.5
    assert "bootstrap" in bootstrap_ci([1.0] * 6).method and "Wilson" in wilson_interval(1, 2).method


def test_bootstrap_ci_edge_cases():
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_paired_test_detects_a_real_shift():
    rng = np.random.default_rng(3)
    baseline = rng.normal(30, 3, size=40)
    method = baseline + 0.5 + rng.normal(0, 0.5, size=40)
    test = paired_test(method, baseline)
    assert test.p_value < 0.001
    assert 0 < test.difference.low < 0.5 < test.difference.high < 1.0
    assert test.n == 40


def test_paired_test_does_not_detect_a_null_shift():
    rng = np.random.default_rng(4)
    rejections = 0
    for _ in range(100):
        baseline = rng.normal(30, 3, size=30)
        rejections += paired_test(baseline + rng.normal(0, 1, size=30), baseline, n_resamples=200).p_value < 0.05
    assert rejections <= 12  # about 5 expected
    assert paired_test([1.0, 2.0] * 3, [1.0, 2.0] * 3).p_value == 1.0


def test_wilson_interval():
    ci = wilson_interval(8, 10)
    assert ci.estimate == 0.8
    assert ci.low == pytest.approx(0.4902, abs=1e-3) and ci.high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5).low == 0.0 and wilson_interval(5, 5).high == 1.0
