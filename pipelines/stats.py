"""Statistics for pairwise judge evaluations (SHARD): pure functions, no SciPy needed at run time.

A pairwise comparison of a candidate with a reference on one prompt ends in a win, a tie or a loss
for the candidate. Over ``n`` prompts with ``W`` wins, ``T`` ties and ``L`` losses:

- the **win rate** is ``W / (W + L)``, over the decisive (non-tie) comparisons, with a Wilson score
  interval (:func:`wilson_interval`);
- the **exact binomial test** asks whether ``W`` of ``W + L`` decisive comparisons is compatible with
  a coin flip (``p = 0.5``) (:func:`binomial_test`);
- two candidates judged on the **same** prompts are compared with **McNemar's test** on the paired
  win indicators (:func:`mcnemar`);
- two candidates judged on possibly **different** prompt sets (self- vs teacher-supervision) are
  compared with the **two-proportion z-test** on their win rates (:func:`two_proportion_z`).

Every function returns plain floats / ``None`` (undefined: no data), so results go to JSON as they are.
The unit tests check them against SciPy and against numbers worked out by hand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

WIN, TIE, LOSS = "win", "tie", "loss"
OUTCOMES = (WIN, TIE, LOSS)

#: below this many discordant pairs McNemar's test is exact (binomial), at or above it the
#: chi-square approximation with continuity correction is used (the usual rule of thumb)
MCNEMAR_EXACT_BELOW = 25


def normal_quantile(confidence: float) -> float:
    """The two-sided standard normal quantile ``z`` with ``P(|Z| <= z) = confidence`` (1.95996... for
    0.95), by bisection on :func:`math.erf` (``P(|Z| <= z) = erf(z / √2)``)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if math.erf(mid / math.sqrt(2)) < confidence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion ``p̂ = successes / n``::

        centre    = (p̂ + z²/2n) / (1 + z²/n)
        half width = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²)

    with ``z`` the two-sided normal quantile of ``confidence``. Unlike the Wald interval it stays in
    [0, 1] and is sensible for ``p̂ = 0`` or ``1`` and small ``n``. ``None`` when ``n = 0``.
    """
    if n == 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside [0, {n}]")
    z = normal_quantile(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _binomial_pmf(k: int, n: int, p: float) -> float:
    """``C(n, k) p^k (1 − p)^(n−k)``, in log space so that large ``n`` does not overflow."""
    if p in (0.0, 1.0):
        return float(k == (n if p == 1.0 else 0))
    log_pmf = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p))
    return math.exp(log_pmf)


def binomial_test(successes: int, n: int, p: float = 0.5) -> float | None:
    """Exact two-sided binomial test of ``H0: P(success) = p``: the p-value is the total probability
    of the outcomes no more likely than the observed one,

        p-value = Σ_{i : P(X = i) <= P(X = k)} P(X = i),   X ~ Binomial(n, p),

    (SciPy's ``binomtest``, with the same relative tolerance 1e-7 for ties in probability). For
    ``p = 0.5`` this is ``min(1, 2 · P(X <= min(k, n − k)))``. ``None`` when ``n = 0``.
    """
    if n == 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside [0, {n}]")
    observed = _binomial_pmf(successes, n, p)
    threshold = observed * (1 + 1e-7)
    total = sum(prob for i in range(n + 1) if (prob := _binomial_pmf(i, n, p)) <= threshold)
    return min(1.0, total)


@dataclass(frozen=True)
class McNemar:
    """McNemar's test on paired binary outcomes: ``b`` pairs where only the first system succeeds,
    ``c`` where only the second does; ``method`` is ``exact`` or ``chi2_cc``."""

    b: int
    c: int
    method: str
    statistic: float | None
    p_value: float

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar(b: int, c: int, exact_below: int = MCNEMAR_EXACT_BELOW) -> McNemar:
    """McNemar's test of ``H0``: both systems succeed equally often on the same items. Only the
    discordant pairs count (``b``: first succeeds and second fails, ``c``: the reverse).

    - ``b + c < exact_below``: **exact** - under ``H0`` ``b ~ Binomial(b + c, 1/2)``, so the p-value is
      the two-sided :func:`binomial_test` of ``b`` out of ``b + c`` (statistic: ``min(b, c)``);
    - otherwise the **chi-square test with continuity correction** (Edwards):
      ``χ² = (|b − c| − 1)² / (b + c)`` with one degree of freedom, p-value ``= P(χ²₁ >= χ²) =
      erfc(sqrt(χ²/2))``.

    No discordant pair (``b = c = 0``): no evidence either way, p-value 1.
    """
    n = b + c
    if n == 0:
        return McNemar(b, c, "exact", None, 1.0)
    if n < exact_below:
        return McNemar(b, c, "exact", float(min(b, c)), binomial_test(b, n, 0.5))
    chi2 = (abs(b - c) - 1) ** 2 / n
    return McNemar(b, c, "chi2_cc", chi2, math.erfc(math.sqrt(chi2 / 2)))


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> dict | None:
    """Two-sided two-proportion z-test of ``H0: p1 = p2`` with the pooled standard error::

        p̂ = (x1 + x2) / (n1 + n2)
        z  = (x1/n1 − x2/n2) / sqrt(p̂(1 − p̂)(1/n1 + 1/n2))
        p-value = 2 (1 − Φ(|z|)) = erfc(|z| / √2)

    ``None`` when a sample is empty; ``z = 0``, p-value 1 when both proportions are equal (the
    pooled variance is then 0 if they are both 0 or both 1).
    """
    if n1 == 0 or n2 == 0:
        return None
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if p1 == p2 or variance == 0:
        return {"p1": p1, "p2": p2, "difference": p1 - p2, "z": 0.0, "p_value": 1.0}
    z = (p1 - p2) / math.sqrt(variance)
    return {"p1": p1, "p2": p2, "difference": p1 - p2, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


def win_tie_loss(outcomes: list[str], confidence: float = 0.95) -> dict:
    """Counts and shares of win / tie / loss, the win rate ``W / (W + L)`` over decisive
    comparisons with its Wilson interval, and the exact binomial test of the wins against 0.5 on
    the non-ties."""
    unknown = set(outcomes) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"outcomes must be {OUTCOMES}, got {sorted(unknown)}")
    n = len(outcomes)
    counts = {o: outcomes.count(o) for o in OUTCOMES}
    decisive = counts[WIN] + counts[LOSS]
    interval = wilson_interval(counts[WIN], decisive, confidence)
    return {
        "n": n, **counts,
        "shares": {o: (counts[o] / n if n else None) for o in OUTCOMES},
        "decisive": decisive,
        "win_rate": counts[WIN] / decisive if decisive else None,
        "win_rate_ci": list(interval) if interval else None,
        "confidence": confidence,
        "binomial_p": binomial_test(counts[WIN], decisive, 0.5),
    }
