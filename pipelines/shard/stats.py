"""Statistics for pairwise judge evaluations (SHARD): thin wrappers over SciPy and statsmodels that
fix our contract (which test, when it is undefined, plain JSON numbers, the name of the test).

A pairwise comparison of a candidate with a reference on one prompt ends in a win, a tie or a loss
for the candidate. Over ``n`` prompts with ``W`` wins, ``T`` ties and ``L`` losses
(:func:`win_tie_loss`):

- the **win rate** is ``W / (W + L)``, over the decisive (non-tie) comparisons, with a Wilson score
  interval (``statsmodels.stats.proportion.proportion_confint(W, W + L, method="wilson")``);
- the **exact binomial test** of ``W`` of ``W + L`` against a coin flip, ``p = 0.5``
  (``scipy.stats.binomtest``): **one-sided** by default, ``H1: P(win | decisive) > 0.5``, as SHARD's
  ``scripts/significance_tests.py`` (``alternative="greater"``), or two-sided (``alternative=
  "two-sided"``, about twice the one-sided p-value when the candidate wins more). Every result names
  its test (:func:`binomial_test_name`).

:func:`position_fisher` is SHARD's position-bias test of a judge (``significance_tests.py``): the
candidate's wins and losses when it was shown as A against when it was shown as B, Fisher's exact
test. :func:`mcnemar_decisive` compares two systems judged on the **same** prompts as SHARD's
``eval_stats_all.py`` does (McNemar on the prompts decisive in both); the evaluation's own paired test
between fine-tuned systems is :func:`pipelines.core.statistics.mcnemar` on the win indicators.

Every result is plain floats / ints / ``None`` (undefined: no data), so it goes to JSON as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

# SciPy and statsmodels are imported inside the functions: the outcome names below are imported by
# every Ray Data worker that reads verdicts (pipelines.shard.pairwise), which never computes a test.

WIN, TIE, LOSS = "win", "tie", "loss"
OUTCOMES = (WIN, TIE, LOSS)
#: alternatives of the binomial test: SHARD's one-sided (the candidate wins more often), or two-sided
ALTERNATIVES = ("greater", "two-sided")

#: the test of :func:`position_fisher`
FISHER_TEST = "Fisher exact, two-sided"


def binomial_test_name(alternative: str) -> str:
    """The label of the binomial test under ``alternative`` (stored beside every p-value)."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"binomial alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    return ("exact binomial vs 0.5, one-sided (wins > 0.5)" if alternative == "greater"
            else "exact binomial vs 0.5, two-sided")


#: the default test behind ``binomial_p`` of :func:`win_tie_loss` (SHARD's)
BINOMIAL_TEST = binomial_test_name("greater")


def win_tie_loss(outcomes: list[str], confidence: float = 0.95, alternative: str = "greater") -> dict:
    """Counts and shares of win / tie / loss, the win rate ``p̂ = W / m`` over the ``m = W + L``
    decisive comparisons with its Wilson score interval (statsmodels)::

        centre     = (p̂ + z²/2m) / (1 + z²/m)
        half width = z / (1 + z²/m) · sqrt(p̂(1 − p̂)/m + z²/4m²)

    and the exact binomial test of ``H0: P(win | decisive) = 0.5`` (``scipy.stats.binomtest``):
    ``alternative="greater"`` (SHARD's): ``p = P(X >= W)``, ``X ~ Binomial(m, 0.5)``;
    ``"two-sided"``: ``min(1, 2 · P(X <= min(W, L)))``. The win rate, interval and p-value are
    ``None`` when there is no decisive comparison."""
    from scipy.stats import binomtest
    from statsmodels.stats.proportion import proportion_confint

    name = binomial_test_name(alternative)
    unknown = set(outcomes) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"outcomes must be {OUTCOMES}, got {sorted(unknown)}")
    n = len(outcomes)
    counts = {o: outcomes.count(o) for o in OUTCOMES}
    decisive = counts[WIN] + counts[LOSS]
    interval = p_value = None
    if decisive:  # binomtest needs at least one trial
        low, high = proportion_confint(counts[WIN], decisive, alpha=1 - confidence, method="wilson")
        interval = [float(low), float(high)]
        p_value = float(binomtest(counts[WIN], decisive, 0.5, alternative=alternative).pvalue)
    return {
        "n": n, **counts,
        "shares": {o: (counts[o] / n if n else None) for o in OUTCOMES},
        "decisive": decisive,
        "win_rate": counts[WIN] / decisive if decisive else None,
        "win_rate_ci": interval,
        "confidence": confidence,
        "binomial_p": p_value,
        "binomial_test": name,
    }


def position_fisher(positions: Sequence[str], outcomes: Sequence[str]) -> dict:
    """SHARD's position-bias test of the judge (``significance_tests.py``, ``position_bias_test``):
    does the candidate win as often when it is shown as answer A as when it is shown as B? On the
    decisive comparisons, the 2 × 2 table

        ==========  ==============  ================
        position    candidate wins  candidate loses
        ==========  ==============  ================
        A           k_A             n_A − k_A
        B           k_B             n_B − k_B
        ==========  ==============  ================

    and Fisher's exact test, two-sided (``scipy.stats.fisher_exact``), of ``H0``: the win rate does
    not depend on the position. ``positions[i]`` is where the candidate was shown (``A`` / ``B``),
    ``outcomes[i]`` its win / tie / loss; ties are left out, as in SHARD. ``p_value`` is ``None``
    without a decisive comparison."""
    from scipy.stats import fisher_exact

    if len(positions) != len(outcomes):
        raise ValueError(f"{len(positions)} positions but {len(outcomes)} outcomes")
    if set(positions) - {"A", "B"}:
        raise ValueError(f"positions must be A or B, got {sorted(set(positions) - {'A', 'B'})}")
    cells = {p: [0, 0] for p in ("A", "B")}
    for position, result in zip(positions, outcomes):
        if result in (WIN, LOSS):
            cells[position][0 if result == WIN else 1] += 1
    table = [cells["A"], cells["B"]]
    n_a, n_b = sum(cells["A"]), sum(cells["B"])
    p_value = float(fisher_exact(table, alternative="two-sided").pvalue) if n_a + n_b else None
    return {"table": table, "wins_at_a": cells["A"][0], "decisive_at_a": n_a,
            "win_rate_at_a": cells["A"][0] / n_a if n_a else None,
            "wins_at_b": cells["B"][0], "decisive_at_b": n_b,
            "win_rate_at_b": cells["B"][0] / n_b if n_b else None,
            "p_value": p_value, "test": FISHER_TEST}


def mcnemar_decisive(first: Sequence[str], second: Sequence[str]) -> dict:
    """Two variants' outcomes on the same prompts (``first[i]``, ``second[i]``: prompt ``i``), compared
    as SHARD's ``eval_stats_all.py`` does between inference-time variants: only the prompts decisive
    (win or loss) in **both** count, and McNemar's test (:func:`pipelines.core.statistics.mcnemar`,
    statsmodels) runs on their win indicators; ``ties_skipped`` is how many prompts a tie left out."""
    from pipelines.core.statistics import mcnemar

    if len(first) != len(second):
        raise ValueError(f"McNemar's test needs paired outcomes: {len(first)} and {len(second)}")
    both = [(a, b) for a, b in zip(first, second) if a in (WIN, LOSS) and b in (WIN, LOSS)]
    result = mcnemar([a == WIN for a, _ in both], [b == WIN for _, b in both]).as_dict()
    return {**result, "ties_skipped": len(first) - len(both)}
