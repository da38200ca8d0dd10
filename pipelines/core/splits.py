"""Seeded, stratified train / val / test splits (SHARD: 72 / 8 / 20 by dataset and harm level).

Within one stratum the distinct text keys are ordered by a seeded hash and cut by cumulative
rounded shares, so identical texts share a split, the assignment does not depend on row order or
partitioning, and every stratum gets its share up to rounding.
"""

from __future__ import annotations

import hashlib
import math


def split_sizes(n: int, shares: dict[str, float]) -> dict[str, int]:
    """How many of ``n`` items each split gets: split ``i`` (in the order of ``shares``) ends at
    ``round(n × (s_1 + ... + s_i))``, rounding halves up. The sizes add up to ``n`` when the shares
    add up to 1; a stratum too small for a split gives it 0 (72/8/20 of 3 items: 2 / 0 / 1 with test
    first)."""
    sizes, cumulative, placed = {}, 0.0, 0
    for name, share in shares.items():
        cumulative += share
        end = min(n, math.floor(n * cumulative + 0.5 + 1e-9))
        sizes[name] = end - placed
        placed = end
    return sizes


def hash_rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def assign_splits(keys: list[str], shares: dict[str, float], seed: int) -> dict[str, str]:
    """Map each distinct key of one stratum to a split: keys ordered by :func:`hash_rank`, the first
    ``sizes[first split]`` to the first split of ``shares`` and so on (:func:`split_sizes`)."""
    distinct = sorted(set(keys), key=lambda k: hash_rank(seed, k))
    out, start = {}, 0
    for name, size in split_sizes(len(distinct), shares).items():
        out.update({k: name for k in distinct[start:start + size]})
        start += size
    return out
