"""Paired statistics shared by the evaluations (guard comparison, SHARD's pairwise judging): thin
wrappers over SciPy and statsmodels that fix our contract (which test, when a value is undefined,
plain JSON numbers, the name of the test). Nothing here is hand-written statistics.

- :func:`mcnemar`: McNemar's test of two systems' per-item success on the **same** items (a paired
  sample; an unpaired test would treat them as independent, which they are not).
- :func:`bootstrap_f1`: a percentile bootstrap interval for F1, resampling rows (``scipy.stats.
  bootstrap``, paired: a row's gold label and prediction are drawn together).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# SciPy and statsmodels are imported inside the functions: modules that only need the names below
# are imported by every Ray Data worker.

#: McNemar's test as :func:`mcnemar` chose it
MCNEMAR_EXACT = "McNemar exact"
MCNEMAR_CHI2 = "McNemar chi2 cc"
#: below this many discordant pairs McNemar's test is exact (binomial), at or above it the
#: chi-square approximation with continuity correction is used (the usual rule of thumb)
MCNEMAR_EXACT_BELOW = 25


@dataclass(frozen=True)
class McNemar:
    """McNemar's test on ``n`` paired binary outcomes: ``first_wins`` / ``second_wins`` items where
    each system succeeds, ``b`` where only the first does, ``c`` where only the second does; ``test``
    is :data:`MCNEMAR_EXACT` or :data:`MCNEMAR_CHI2`."""

    n: int
    first_wins: int
    second_wins: int
    b: int
    c: int
    test: str
    statistic: float
    p_value: float

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar(first: Sequence[bool], second: Sequence[bool], exact_below: int = MCNEMAR_EXACT_BELOW) -> McNemar:
    """McNemar's test of ``H0``: on the same items, both systems succeed equally often
    (``P(first succeeds) = P(second succeeds)``). ``first[i]`` and ``second[i]`` are the two
    systems' outcomes on item ``i``. Only the discordant pairs count (``b``: the first succeeds and
    the second fails, ``c``: the reverse), via ``statsmodels.stats.contingency_tables.mcnemar``:

    - ``b + c < exact_below``: **exact**, under ``H0`` ``b ~ Binomial(b + c, 1/2)``: p-value
      ``min(1, 2 · P(X <= min(b, c)))``, statistic ``min(b, c)``;
    - otherwise **chi-square with continuity correction** (Edwards):
      ``χ² = (|b − c| − 1)² / (b + c)``, one degree of freedom, p-value ``P(χ²₁ >= χ²)``.

    No discordant pair (``b = c = 0``): no evidence either way, statistic 0, p-value 1.
    """
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    if len(first) != len(second):
        raise ValueError(f"McNemar's test needs paired outcomes: {len(first)} for the first system, "
                         f"{len(second)} for the second")
    pairs = list(zip(map(bool, first), map(bool, second)))
    table = [[pairs.count((True, True)), pairs.count((True, False))],
             [pairs.count((False, True)), pairs.count((False, False))]]
    b, c = table[0][1], table[1][0]
    exact = b + c < exact_below or b + c == 0  # without discordant pairs χ² is 0 / 0
    result = sm_mcnemar(table, exact=exact, correction=True)
    return McNemar(n=len(pairs), first_wins=sum(table[0]), second_wins=table[0][0] + table[1][0], b=b, c=c,
                   test=MCNEMAR_EXACT if exact else MCNEMAR_CHI2, statistic=float(result.statistic),
                   p_value=float(result.pvalue))


def f1_of(gold: np.ndarray, pred: np.ndarray, axis: int = -1) -> np.ndarray:
    """F1 of the positive class along ``axis`` for 0/1 arrays: ``2tp / (2tp + fp + fn)``, NaN where
    undefined (no gold and no predicted positive). Vectorised: ``scipy.stats.bootstrap`` hands it
    every resample at once."""
    tp = (gold * pred).sum(axis)
    fp = ((1 - gold) * pred).sum(axis)
    fn = (gold * (1 - pred)).sum(axis)
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval: ``low`` / ``high`` (``None`` when undefined), from ``resamples`` resamples
    of which ``undefined`` had no defined statistic, at ``confidence``."""

    low: float | None
    high: float | None
    resamples: int
    undefined: int
    confidence: float


def bootstrap_f1(gold: Sequence[int], pred: Sequence[int], *, resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> Interval:
    """Percentile bootstrap interval of F1 (:func:`f1_of`) over rows: ``resamples`` samples of the
    ``n`` rows drawn with replacement, each row's gold label and prediction together
    (``scipy.stats.bootstrap(..., paired=True)``, seeded, so the same seed gives the same interval).
    The interval is the ``(1 − confidence)/2`` and ``(1 + confidence)/2`` quantiles of the resampled
    F1 values that are defined: a resample without any gold- or predicted-positive row has no F1
    (SciPy's own percentile would turn the whole interval into NaN); how many there were is in
    ``undefined``. No rows, or no resample with an F1: ``low = high = None``."""
    import warnings

    from scipy.stats import DegenerateDataWarning, bootstrap

    gold_a = np.asarray(gold, dtype=np.float64)
    pred_a = np.asarray(pred, dtype=np.float64)
    if gold_a.shape != pred_a.shape:
        raise ValueError(f"{gold_a.size} gold labels but {pred_a.size} predictions")
    if gold_a.size == 0:
        return Interval(None, None, 0, 0, confidence)
    if gold_a.size == 1:  # SciPy needs two observations; every resample is the row itself
        values = np.repeat(f1_of(gold_a, pred_a), resamples)
    else:
        with warnings.catch_warnings():  # undefined resamples: handled below, not SciPy's concern
            warnings.simplefilter("ignore", DegenerateDataWarning)
            result = bootstrap((gold_a, pred_a), f1_of, paired=True, vectorized=True, n_resamples=resamples,
                               confidence_level=confidence, method="percentile",
                               batch=max(1, 20_000_000 // gold_a.size),  # ~160 MB of resamples at a time
                               rng=np.random.default_rng(seed))
        values = np.asarray(result.bootstrap_distribution)
    defined = values[~np.isnan(values)]
    if not defined.size:
        return Interval(None, None, resamples, resamples, confidence)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(defined, [alpha, 1 - alpha])
    return Interval(float(low), float(high), resamples, int(values.size - defined.size), confidence)
