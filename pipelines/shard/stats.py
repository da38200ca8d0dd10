"""Statistics for pairwise judge evaluations (SHARD): thin wrappers over SciPy and statsmodels that
fix our contract (which test, when it is undefined, plain JSON numbers, the name of the test).

A pairwise comparison of a candidate with a reference on one prompt ends in a win, a tie or a loss
for the candidate. Over ``n`` prompts with ``W`` wins, ``T`` ties and ``L`` losses
(:func:`win_tie_loss`):

- the **win rate** is ``W / (W + L)``, over the decisive (non-tie) comparisons, with a Wilson score
  interval (``scipy.stats.binomtest(W, W + L).proportion_ci(method="wilson")``, no continuity
  correction);
- the **exact binomial test** (:data:`BINOMIAL_TEST`) asks whether ``W`` of ``W + L`` decisive
  comparisons is compatible with a coin flip, ``p = 0.5``, two-sided (``scipy.stats.binomtest``).

Two systems judged on the **same** prompts are a paired sample: :func:`pipelines.core.statistics.mcnemar` compares
them with McNemar's test on the per-prompt win indicators (``statsmodels``). An unpaired test (such as the
two-proportion z-test) would treat the two systems' outcomes as independent samples, which they are
not, so none is offered.

Every result is plain floats / ints / ``None`` (undefined: no data), so it goes to JSON as it is,
and every p-value comes with the name of its test.
"""

from __future__ import annotations

# SciPy and statsmodels are imported inside the functions: the outcome names below are imported by
# every Ray Data worker that reads verdicts (pipelines.shard.pairwise), which never computes a test.

WIN, TIE, LOSS = "win", "tie", "loss"
OUTCOMES = (WIN, TIE, LOSS)

#: the test behind ``binomial_p`` of :func:`win_tie_loss`
BINOMIAL_TEST = "exact binomial vs 0.5"


def win_tie_loss(outcomes: list[str], confidence: float = 0.95) -> dict:
    """Counts and shares of win / tie / loss, the win rate ``W / (W + L)`` over decisive
    comparisons with its Wilson score interval::

        centre     = (p̂ + z²/2m) / (1 + z²/m)
        half width = z / (1 + z²/m) · sqrt(p̂(1 − p̂)/m + z²/4m²),   p̂ = W / m,  m = W + L

    and the exact two-sided binomial test of ``H0: P(win | decisive) = 0.5``: the p-value is the
    total probability under ``Binomial(m, 0.5)`` of the outcomes no more likely than ``W``, i.e.
    ``min(1, 2 · P(X <= min(W, L)))``. Both from ``scipy.stats.binomtest``. The win rate, interval
    and p-value are ``None`` when there is no decisive comparison."""
    from scipy.stats import binomtest

    unknown = set(outcomes) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"outcomes must be {OUTCOMES}, got {sorted(unknown)}")
    n = len(outcomes)
    counts = {o: outcomes.count(o) for o in OUTCOMES}
    decisive = counts[WIN] + counts[LOSS]
    interval = p_value = None
    if decisive:  # binomtest needs at least one trial
        test = binomtest(counts[WIN], decisive, 0.5)
        ci = test.proportion_ci(confidence_level=confidence, method="wilson")
        interval, p_value = [float(ci.low), float(ci.high)], float(test.pvalue)
    return {
        "n": n, **counts,
        "shares": {o: (counts[o] / n if n else None) for o in OUTCOMES},
        "decisive": decisive,
        "win_rate": counts[WIN] / decisive if decisive else None,
        "win_rate_ci": interval,
        "confidence": confidence,
        "binomial_p": p_value,
        "binomial_test": BINOMIAL_TEST,
    }
