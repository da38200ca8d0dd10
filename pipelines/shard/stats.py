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

Two systems judged on the **same** prompts are a paired sample: :func:`mcnemar` compares them with
McNemar's test on the per-prompt win indicators (``statsmodels``). An unpaired test (such as the
two-proportion z-test) would treat the two systems' outcomes as independent samples, which they are
not, so none is offered.

Every result is plain floats / ints / ``None`` (undefined: no data), so it goes to JSON as it is,
and every p-value comes with the name of its test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

# SciPy and statsmodels are imported inside the functions: the outcome names below are imported by
# every Ray Data worker that reads verdicts (pipelines.shard.pairwise), which never computes a test.

WIN, TIE, LOSS = "win", "tie", "loss"
OUTCOMES = (WIN, TIE, LOSS)

#: the test behind ``binomial_p`` of :func:`win_tie_loss`
BINOMIAL_TEST = "exact binomial vs 0.5"
#: McNemar's test as :func:`mcnemar` chose it
MCNEMAR_EXACT = "McNemar exact"
MCNEMAR_CHI2 = "McNemar chi2 cc"
#: below this many discordant pairs McNemar's test is exact (binomial), at or above it the
#: chi-square approximation with continuity correction is used (the usual rule of thumb)
MCNEMAR_EXACT_BELOW = 25


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
