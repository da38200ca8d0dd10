"""MinHash signatures and LSH banding, vectorised with numpy. Pure functions.

Shingles are character n-grams (default 5) of the normalised text, hashed with a polynomial rolling
hash over Unicode code points (deterministic across processes, unlike Python's ``hash``). A signature
is, for each of ``num_perm`` hash functions ``h_k(x) = (a_k * x + b_k) >> 32`` (multiply-shift
universal hashing on 64-bit words, ``a_k`` odd), the minimum over the document's shingles; the
fraction of equal positions between two signatures estimates their Jaccard similarity. LSH splits a
signature into ``bands`` of ``rows``; documents that agree on all rows of any band are candidates,
and with verification every candidate pair is checked (:func:`duplicate_groups`).
"""

from __future__ import annotations

import math

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_BASE = np.uint64(1_000_003)


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` coefficients of the hash family: ``a`` odd, both uniform 64-bit."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """Distinct 64-bit hashes of the character ``n``-grams of ``text`` (one gram if it is shorter):
    ``h = sum_j cp[i + j] * BASE^(n - 1 - j) mod 2^64``."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cps) == 0:
        return np.zeros(0, dtype=np.uint64)
    width = min(n, len(cps))
    h = np.zeros(len(cps) - width + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):
            h = h * _BASE + cps[j:len(cps) - width + 1 + j]
    return np.unique(h)


def signatures(texts: list[str], a: np.ndarray, b: np.ndarray, n: int = 5,
               chunk_shingles: int = 200_000) -> np.ndarray:
    """MinHash signatures, shape ``(len(texts), num_perm)`` uint32. Empty texts get all-max rows.

    All shingles of a chunk of documents are hashed in one ``(num_perm, shingles)`` operation and
    reduced per document with ``np.minimum.reduceat``, so the per-document Python work is only the
    shingling.
    """
    num_perm = len(a)
    out = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    grams = [shingle_hashes(t, n) for t in texts]
    start = 0
    while start < len(texts):
        stop, total = start, 0
        while stop < len(texts) and (total == 0 or total + len(grams[stop]) <= chunk_shingles):
            total += len(grams[stop])
            stop += 1
        docs = [i for i in range(start, stop) if len(grams[i])]
        if docs:
            x = np.concatenate([grams[i] for i in docs])
            offsets = np.cumsum([0] + [len(grams[i]) for i in docs[:-1]])
            with np.errstate(over="ignore"):
                hashed = ((a[:, None] * x[None, :] + b[:, None]) >> np.uint64(32)).astype(np.uint32)
            out[docs] = np.minimum.reduceat(hashed, offsets, axis=1).T
        start = stop
    return out


def collision_probability(s: float, bands: int, rows: int) -> float:
    """P(two documents with Jaccard ``s`` share at least one band) = ``1 - (1 - s^rows)^bands``."""
    return 1.0 - (1.0 - s**rows) ** bands


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising
    ``fp_weight * ∫_0^t P(s) ds + fn_weight * ∫_t^1 (1 - P(s)) ds`` (the false-positive and
    false-negative areas around the threshold ``t``), integrated numerically."""
    grid_lo = np.linspace(0.0, threshold, 201)
    grid_hi = np.linspace(threshold, 1.0, 201)
    best, best_cost = (1, num_perm), math.inf
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        fp = np.trapezoid([collision_probability(s, bands, rows) for s in grid_lo], grid_lo)
        fn = np.trapezoid([1 - collision_probability(s, bands, rows) for s in grid_hi], grid_hi)
        cost = fp_weight * fp + fn_weight * fn
        if cost < best_cost:
            best, best_cost = (bands, rows), cost
    return best


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band): a polynomial hash of the band's ``rows`` values.
    Shape ``(n, bands)``. Distinct bands of equal values get distinct keys through the band index."""
    n = sigs.shape[0]
    keys = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            block = sigs[:, band * rows:(band + 1) * rows].astype(np.uint64)
            h = np.full(n, np.uint64(band + 1) * np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64)
            for r in range(rows):
                h = (h ^ block[:, r]) * np.uint64(0x100000001B3)
            keys[:, band] = h
    return keys


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal signature positions (unbiased estimate of the Jaccard similarity)."""
    return float(np.mean(sig_a == sig_b))


def bucket_pairs(keys: np.ndarray, every: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``(i, j)``, ``i`` before ``j`` in sort order, of rows with equal ``keys`` (one band's
    bucket keys): ``s * (s - 1) / 2`` pairs per bucket of ``s`` rows, generated without a Python loop.
    ``every=False``: only consecutive members (a chain: the same groups when pairs need no check)."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    if not every:
        return order[:-1][same], order[1:][same]
    starts = np.flatnonzero(np.r_[True, ~same])
    ends = np.repeat(np.r_[starts[1:], n], np.diff(np.r_[starts, n]))  # bucket end of each position
    later = ends - np.arange(n) - 1  # members after each position in its bucket
    first = np.repeat(np.arange(n), later)
    offset = np.arange(len(first)) - np.repeat(np.cumsum(later) - later, later) + 1
    return order[first], order[first + offset]


def _equal_rows(sigs: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Per row, the first row with the same signature (itself if none before it). Rows are grouped
    by a hash of their band keys (cheaper than sorting whole signatures) and then compared in full,
    so a hash collision, or a difference outside the bands, leaves a row on its own."""
    h = np.zeros(len(keys), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(keys.shape[1]):
            h = (h ^ keys[:, band]) * np.uint64(0x100000001B3)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    rep = first[inverse.reshape(-1)]
    copies = np.flatnonzero(rep != np.arange(len(rep)))
    alone = copies[(sigs[copies] != sigs[rep[copies]]).any(axis=1)]
    rep[alone] = alone
    return rep


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Label per row: the smallest row index of its connected component under the edges ``(i, j)``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    smallest = np.full(comp.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(smallest, comp, np.arange(n))
    return smallest[comp]


def duplicate_groups(sigs: np.ndarray, bands: int, rows: int, threshold: float,
                     verify: bool = True, chunk_pairs: int = 1 << 16) -> np.ndarray:
    """Cluster label per document: the smallest index of its group.

    Two documents are linked when they share a band (an LSH bucket) and, with ``verify``, their
    estimated Jaccard is >= ``threshold``; groups are the connected components of these links (so a
    chain of verified links may group two rows that are not similar enough to each other).
    Every pair of members of a bucket is verified, not only each member against the bucket's first
    row: a dissimilar first row must not keep two near-identical members apart (a candidate and its
    test-set twin in decontamination). Rows with equal signatures are linked first and stand in the
    buckets as one row, so a bucket of many exact copies costs one row, not its square; pairs are
    deduplicated over bands and verified in chunks of ``chunk_pairs``.
    """
    n = sigs.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    keys = band_keys(sigs, bands, rows)
    rep = _equal_rows(sigs, keys)
    first = np.flatnonzero(rep == np.arange(n))  # one row per distinct signature
    m = len(first)
    found = [bucket_pairs(keys[first, band], every=verify) for band in range(bands)]
    codes = np.unique(np.concatenate([np.minimum(a, b) * m + np.maximum(a, b) for a, b in found]))
    a, b = first[codes // m], first[codes % m]
    if verify:
        keep = np.zeros(len(codes), dtype=bool)
        for lo in range(0, len(codes), chunk_pairs):  # bounded memory: chunk x num_perm comparisons
            sl = slice(lo, lo + chunk_pairs)
            keep[sl] = (sigs[a[sl]] == sigs[b[sl]]).mean(axis=1) >= threshold
        a, b = a[keep], b[keep]
    return _components(n, np.r_[rep, a], np.r_[np.arange(n), b])
