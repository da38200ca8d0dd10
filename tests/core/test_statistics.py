"""The shared paired statistics (pipelines/core/statistics.py): McNemar's test by hand and against
statsmodels, and the bootstrap interval of F1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as sp

from pipelines.core.statistics import MCNEMAR_CHI2, MCNEMAR_EXACT, MCNEMAR_EXACT_BELOW, bootstrap_f1, f1_of, mcnemar


def test_mcnemar_exact_and_chi_square_by_hand():
    # exact: b = 1, c = 6 (7 discordant), 5 concordant pairs: 2 · (1 + 7) / 128 = 0.125
    first = [True] * 1 + [False] * 6 + [True] * 2 + [False] * 3
    second = [False] * 1 + [True] * 6 + [True] * 2 + [False] * 3
    small = mcnemar(first, second)
    assert (small.n, small.b, small.c, small.first_wins, small.second_wins) == (12, 1, 6, 3, 8)
    assert (small.test, small.statistic, small.p_value) == (MCNEMAR_EXACT, 1.0, pytest.approx(16 / 128))
    # chi-square with continuity correction: (|30 − 12| − 1)² / 42 = 289 / 42, P(χ²₁ >= x) = erfc(√(x/2))
    large = mcnemar([True] * 30 + [False] * 12, [False] * 30 + [True] * 12)
    assert large.test == MCNEMAR_CHI2 and large.statistic == pytest.approx(289 / 42)
    assert large.p_value == pytest.approx(math.erfc(math.sqrt(289 / 84)), rel=1e-12)
    # no discordant pair: no evidence either way
    assert mcnemar([True, False], [True, False]).p_value == 1.0 and mcnemar([], []).p_value == 1.0
    assert mcnemar([True] * 5 + [False] * 5, [False] * 5 + [True] * 5).p_value == pytest.approx(1.0)


@pytest.mark.parametrize("b,c", [(1, 6), (12, 12), (3, 21), (13, 12), (30, 12), (100, 70)])
def test_mcnemar_against_the_library_and_the_exact_threshold(b, c):
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    result = mcnemar([True] * b + [False] * c + [True] * 4, [False] * b + [True] * c + [True] * 4)
    exact = b + c < MCNEMAR_EXACT_BELOW
    library = sm_mcnemar([[4, b], [c, 0]], exact=exact, correction=True)
    assert result.test == (MCNEMAR_EXACT if exact else MCNEMAR_CHI2)
    assert (result.statistic, result.p_value) == (pytest.approx(library.statistic), pytest.approx(library.pvalue))
    if exact:  # the exact test is the two-sided binomial test of b of b + c at 1/2
        assert result.p_value == pytest.approx(sp.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


def test_mcnemar_needs_paired_outcomes():
    with pytest.raises(ValueError, match="paired outcomes: 3 for the first system, 2 for the second"):
        mcnemar([True, False, True], [True, False])


def test_f1_of_matches_the_formula_and_leaves_undefined_as_nan():
    gold = np.array([1, 1, 1, 0, 0, 0, 0])
    pred = np.array([1, 1, 0, 1, 0, 0, 0])  # tp 2, fp 1, fn 1: F1 = 4 / 6
    assert f1_of(gold, pred) == pytest.approx(4 / 6)
    assert np.isnan(f1_of(np.zeros(3), np.zeros(3)))          # no gold and no predicted positive
    assert f1_of(np.zeros(3), np.array([0, 1, 0])) == 0.0      # a false alarm only: defined, 0


def test_bootstrap_f1_contains_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 300)
    pred = np.where(rng.random(300) < 0.8, gold, 1 - gold)  # about 80 % right
    point = float(f1_of(gold, pred))
    first = bootstrap_f1(gold, pred, resamples=500, seed=7)
    assert first.low < point < first.high and first.high - first.low < 0.2
    assert (first.resamples, first.undefined, first.confidence) == (500, 0, 0.95)
    assert bootstrap_f1(gold, pred, resamples=500, seed=7) == first       # same seed, same interval
    assert bootstrap_f1(gold, pred, resamples=500, seed=8) != first
    wider = bootstrap_f1(gold, pred, resamples=500, seed=7, confidence=0.99)
    assert wider.low <= first.low and wider.high >= first.high


def test_bootstrap_f1_leaves_out_undefined_resamples_and_says_how_many():
    # one positive row in ten, predicted right: about (9/10)^10 of the resamples hold no positive
    gold = np.array([1] + [0] * 9)
    result = bootstrap_f1(gold, gold.copy(), resamples=2000, seed=0)
    assert result.low == result.high == 1.0                       # every defined resample is perfect
    assert 0.25 * 2000 < result.undefined < 0.45 * 2000           # (0.9)^10 = 0.35
    none = bootstrap_f1(np.zeros(5), np.zeros(5), resamples=100)
    assert (none.low, none.high, none.undefined) == (None, None, 100)
    assert bootstrap_f1([], [], resamples=100).low is None
    with pytest.raises(ValueError, match="3 gold labels but 2 predictions"):
        bootstrap_f1([1, 0, 1], [1, 0])
