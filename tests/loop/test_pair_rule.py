"""Issue 28, item 12: without a cap a seed gives as many pairs as its candidates allow (the greedy rule
gave one pair for {L1, L2, L3, L4}, where ⟨L1,L3⟩ + ⟨L2,L4⟩ are two); with a cap the pairs are the
highest-priority ones, and the default cap of 1 keeps the pair the greedy rule chose. Pure functions."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from pipelines.loop.levels import L1, L2, L3, L4, LEVELS, PAIR_PRIORITY, make_pairs

rng = np.random.default_rng


def types(pairs) -> list[str]:
    return [p.type for p in pairs]


def greedy_first_pair(candidates, seed):
    """The first pair of the greedy rule this replaces (levels.py before issue 28): each level's ids
    sorted then shuffled by the generator; all ⟨L1,L4⟩, then ⟨L1,L3⟩, then ⟨L2,L4⟩."""
    generator = rng(seed)
    buckets = {level: [] for level in LEVELS}
    for cid, level in sorted(candidates):
        if level is not None:
            buckets[level].append(cid)
    for level in LEVELS:
        buckets[level] = [buckets[level][i] for i in generator.permutation(len(buckets[level]))]
    for chosen, rejected in PAIR_PRIORITY:
        if buckets[chosen] and buckets[rejected]:
            return buckets[chosen][0], buckets[rejected][0], chosen, rejected
    return None


def most_pairs(counts: Counter, cap: int | None) -> tuple[int, int, int]:
    """Brute force: of every (⟨L1,L4⟩, ⟨L1,L3⟩, ⟨L2,L4⟩) count the candidates allow and the cap
    admits, the largest total, then the most ⟨L1,L4⟩, then the most ⟨L1,L3⟩."""
    n1, n2, n3, n4 = (counts[level] for level in LEVELS)
    feasible = [(a, b, c) for a in range(n1 + 1) for b in range(n3 + 1) for c in range(n2 + 1)
                if a + b <= n1 and a + c <= n4 and (cap is None or a + b + c <= cap)]
    return max(feasible, key=lambda t: (sum(t), t[0], t[1]))


def test_four_levels_give_two_pairs_without_a_cap():
    cands = [("a", L1), ("b", L2), ("c", L3), ("d", L4)]
    assert sorted((p.chosen, p.rejected, p.type) for p in make_pairs(cands, None, rng(0))) == \
        [("a", "c", "<L1,L3>"), ("b", "d", "<L2,L4>")]
    assert types(make_pairs(cands, 1, rng(0))) == ["<L1,L4>"]  # the default cap: the single best pair
    assert types(make_pairs(cands, 2, rng(0))) == ["<L1,L3>", "<L2,L4>"]


@pytest.mark.parametrize("levels,cap,expected", [
    # spending both L4s on the L1s would leave the L2 and the L3 unpaired: 3 pairs instead of 2
    ([L1, L1, L4, L3, L2, L4], None, ["<L1,L4>", "<L1,L3>", "<L2,L4>"]),
    # the same candidates with room for two pairs only: both are the best type
    ([L1, L1, L4, L3, L2, L4], 2, ["<L1,L4>", "<L1,L4>"]),
    # two pairs either way (⟨L1,L4⟩ + ⟨L2,L4⟩ or ⟨L1,L3⟩ + ⟨L2,L4⟩): the one with ⟨L1,L4⟩
    ([L1, L4, L4, L2, L3, L3], None, ["<L1,L4>", "<L2,L4>"]),
    ([L1, L1, L4, L2, L3], None, ["<L1,L4>", "<L1,L3>"]),
    # greedy was already the most: unchanged
    ([L1, L1, L4, L4, L2], None, ["<L1,L4>", "<L1,L4>"]),
    ([L1, L3, L3], None, ["<L1,L3>"]),
    # ⟨L2,L3⟩ is never a pair, ineligible candidates never are in one
    ([L2, L3, L2, L3, None], None, []),
    ([None, L1, None, L4], None, ["<L1,L4>"]),
])
def test_hand_checked_cases(levels, cap, expected):
    cands = [(f"c{i}", level) for i, level in enumerate(levels)]
    assert types(make_pairs(cands, cap, rng(3))) == expected


def test_the_most_pairs_by_priority_on_every_small_seed():
    for size in range(0, 9):
        for levels in itertools.combinations_with_replacement([L1, L2, L3, L4, None], size):
            cands = [(f"c{i}", level) for i, level in enumerate(levels)]
            counts = Counter(levels)
            for cap in (None, 1, 2, 3):
                pairs = make_pairs(cands, cap, rng(size))
                got = Counter(p.type for p in pairs)
                assert (got["<L1,L4>"], got["<L1,L3>"], got["<L2,L4>"]) == most_pairs(counts, cap), (levels, cap)
                used = [x for p in pairs for x in (p.chosen, p.rejected)]
                assert len(used) == len(set(used))  # a candidate is in one pair at most
                level = dict(cands)
                assert all((level[p.chosen], level[p.rejected]) == (p.chosen_level, p.rejected_level)
                           for p in pairs)
                assert types(pairs) == sorted(types(pairs), key=["<L1,L4>", "<L1,L3>", "<L2,L4>"].index)


def test_the_default_cap_keeps_the_pair_greedy_chose():
    generator = rng(7)
    for trial in range(300):
        k = int(generator.integers(1, 9))
        cands = [(f"id{trial}_{i}", [L1, L2, L3, L4, None][int(generator.integers(5))]) for i in range(k)]
        pairs = make_pairs(cands, 1, rng(trial))
        first = greedy_first_pair(cands, trial)
        assert [(p.chosen, p.rejected, p.chosen_level, p.rejected_level) for p in pairs] == \
            ([first] if first else []), cands
