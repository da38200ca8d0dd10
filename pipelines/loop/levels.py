"""Difficulty levels and preference pairs of the generator–classifier loop (CHILLGuard §4.3, eq. 8–9).
Pure functions.

A candidate is a rewrite of one seed; it keeps the seed's label y*. The classifier of the previous
iteration predicts ŷ and the generator scores its quality s ∈ [1, 5]::

    L1: ŷ ≠ y*, s ≥ 3     (fools the classifier, good rewrite: what the generator should write)
    L2: ŷ ≠ y*, s < 3
    L3: ŷ = y*, s < 3
    L4: ŷ = y*, s ≥ 3

Pairs (chosen, rejected) are made among one seed's candidates by the priority
⟨L1, L4⟩ ≻ ⟨L1, L3⟩ ≻ ⟨L2, L4⟩; ⟨L2, L3⟩ is never used (both sides are flawed: noisy signal).

Our choices where the paper is silent:

- a candidate is in at most one pair, so a seed gives at most ``k // 2`` pairs; ``max_pairs`` (the
  recipe's ``max_pairs_per_seed``, default 1) caps it further. With the default each seed gives its
  single best pair, so the pairs spread over seeds instead of piling up on seeds with many L1s;
- which pairs (:func:`pair_counts`): the most pairs the candidates allow, up to ``max_pairs``; among
  sets of that size, the most ⟨L1, L4⟩, then the most ⟨L1, L3⟩. Taking all ⟨L1, L4⟩ first (greedy)
  can cost pairs: {L1, L2, L3, L4} gives ⟨L1, L4⟩ and leaves L2, L3 unpaired, where ⟨L1, L3⟩ +
  ⟨L2, L4⟩ are two. With a cap of 1 the rule is the priority order itself: the best type present;
- ties inside a level (which L1 pairs with which L4) are broken by a seeded shuffle of each level's
  candidates (:func:`pipelines.core.rows.keyed_rng` of the run seed and the seed row's id), so the
  pairs do not depend on row order and are the same on every run;
- a candidate without a quality score or without a prediction is ineligible: no level, in no pair.
  A classifier answer that is unusable is an error row of the labelling stage and never reaches
  scoring; the pairs stage counts those candidates too (:mod:`pipelines.loop.pairs`, accounting).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

L1, L2, L3, L4 = "L1", "L2", "L3", "L4"
LEVELS = (L1, L2, L3, L4)
#: (chosen level, rejected level), best first
PAIR_PRIORITY: tuple[tuple[str, str], ...] = ((L1, L4), (L1, L3), (L2, L4))
#: s ≥ this is a good rewrite (the paper's 3 on its 1–5 scale)
QUALITY_THRESHOLD = 3


def level_of(gold: str, predicted: str | None, quality: int | None,
             threshold: int = QUALITY_THRESHOLD) -> str | None:
    """The candidate's level (eq. 8), or ``None`` when it is ineligible (no prediction or no score)."""
    if predicted is None or quality is None:
        return None
    wrong = predicted != gold
    good = quality >= threshold
    if wrong:
        return L1 if good else L2
    return L4 if good else L3


def pair_type(chosen: str, rejected: str) -> str:
    return f"<{chosen},{rejected}>"


@dataclass(frozen=True)
class Pair:
    chosen: str          # candidate id
    rejected: str        # candidate id
    chosen_level: str
    rejected_level: str

    @property
    def type(self) -> str:
        return pair_type(self.chosen_level, self.rejected_level)


def pair_counts(n1: int, n2: int, n3: int, n4: int, max_pairs: int | None) -> tuple[int, int, int]:
    """How many ⟨L1,L4⟩, ⟨L1,L3⟩, ⟨L2,L4⟩ pairs ``(a, b, c)`` a seed with ``n1``–``n4`` candidates in
    L1–L4 gives: the most pairs, ``total = min(max_pairs, max_a a + min(n1 − a, n3) + min(n4 − a, n2))``
    (with ``a`` ⟨L1,L4⟩ pairs, the L1s left pair with L3s and the L4s left with L2s); among the sets
    of ``total`` pairs the largest ``a``, then the largest ``b``, and ``c = total − a − b``."""
    def most(a: int) -> int:  # the most pairs with exactly a <L1,L4>
        return a + min(n1 - a, n3) + min(n4 - a, n2)

    top = max(most(a) for a in range(min(n1, n4) + 1))
    total = top if max_pairs is None else min(top, max_pairs)
    # the most <L1,L4> that still reach total (a = min(n1, n4, total) or one of the a giving top does)
    a = next(a for a in range(min(n1, n4, total), -1, -1) if most(a) >= total)
    b = min(n1 - a, n3, total - a)
    return a, b, total - a - b


def make_pairs(candidates: Iterable[tuple[str, str | None]], max_pairs: int | None, rng) -> list[Pair]:
    """Pairs of one seed's candidates ``(id, level or None)``, each candidate used at most once:
    as many of each type as :func:`pair_counts` says, in :data:`PAIR_PRIORITY` order, at most
    ``max_pairs`` (``None``: as many as the candidates allow). ``rng`` (a numpy Generator) breaks
    ties inside a level; candidates are first ordered by id, so the result depends on the set of
    candidates and the generator only."""
    buckets: dict[str, list[str]] = {level: [] for level in LEVELS}
    for cid, level in sorted(candidates, key=lambda c: c[0]):
        if level is not None:
            buckets[level].append(cid)
    for level in LEVELS:
        members = buckets[level]
        buckets[level] = [members[i] for i in rng.permutation(len(members))]
    counts = pair_counts(*(len(buckets[level]) for level in LEVELS), max_pairs)
    pairs: list[Pair] = []
    for (chosen, rejected), n in zip(PAIR_PRIORITY, counts):
        for _ in range(n):  # each level's members in shuffled order, as the default cap always took them
            pairs.append(Pair(buckets[chosen].pop(0), buckets[rejected].pop(0), chosen, rejected))
    return pairs


def no_pair_reason(levels: Sequence[str | None]) -> str:
    """Why a seed's candidates gave no pair (for its ``dropped`` row)."""
    present = {level for level in levels if level is not None}
    if not levels:
        return "no_candidates"
    if not present:
        return "no_eligible_candidates"
    if present <= {L2, L3} and L2 in present and L3 in present:
        return "only_L2_L3"  # the excluded pair type
    return "no_valid_pair"
