"""Near-duplicate grouping (`minhash.duplicate_groups`) on hand-made signatures."""

from __future__ import annotations

import numpy as np

from pipelines.data import minhash

BANDS, ROWS = 2, 10  # 20 positions: band 0 = positions 0-9, band 1 = positions 10-19


def _bucket_with_dissimilar_head() -> np.ndarray:
    """Rows 0, 1, 2 share band 0 (one LSH bucket, row 0 first in it). Row 0 agrees with the others on
    band 0 only (Jaccard 0.5); rows 1 and 2 differ in one position of band 1 (Jaccard 0.95), so they
    share no other band and meet only in row 0's bucket."""
    shared = np.arange(10, dtype=np.uint32)
    return np.stack([
        np.r_[shared, np.arange(100, 110, dtype=np.uint32)],
        np.r_[shared, np.arange(200, 210, dtype=np.uint32)],
        np.r_[shared, np.arange(200, 209, dtype=np.uint32), np.uint32(999)],
    ])


def test_bucket_members_are_verified_against_each_other_not_only_the_first():
    sigs = _bucket_with_dissimilar_head()
    assert minhash.estimated_jaccard(sigs[0], sigs[1]) == 0.5
    assert minhash.estimated_jaccard(sigs[1], sigs[2]) == 0.95
    assert list(minhash.duplicate_groups(sigs, BANDS, ROWS, 0.8)) == [0, 1, 1]
    # the same with the near twins anywhere in the bucket's order, and with other rows around
    order = [1, 0, 3, 2]  # the dissimilar head still first in the bucket
    padded = np.vstack([np.full((1, 20), 7, dtype=np.uint32), sigs])[order]
    assert list(minhash.duplicate_groups(padded, BANDS, ROWS, 0.8)) == [0, 1, 2, 2]
    # unverified, a shared band is enough
    assert list(minhash.duplicate_groups(sigs, BANDS, ROWS, 0.8, verify=False)) == [0, 0, 0]


def test_verified_links_chain_and_label_the_smallest_member():
    """Groups are the connected components of verified pairs (links chain through buckets), each
    labelled by its smallest index; exact copies (a large bucket of equal signatures) join at once."""
    sigs = _bucket_with_dissimilar_head()
    far = sigs[2].copy()
    far[0] = 555  # row 2's twin through band 1 only (Jaccard 0.95); shares no band with row 1
    copies = np.repeat(sigs[1][None], 50, axis=0)
    lone = np.arange(1000, 1020, dtype=np.uint32)[None]
    all_sigs = np.vstack([lone, far[None], sigs, copies])
    labels = minhash.duplicate_groups(all_sigs, BANDS, ROWS, 0.8)
    assert list(labels[:5]) == [0, 1, 2, 1, 1]  # lone row, far twin, dissimilar head, the near twins
    assert (labels[5:] == 1).all()


def test_many_small_buckets_are_grouped_in_bulk():
    """Candidate pairs are generated and verified in bulk, not in a Python loop per bucket: 200,000
    rows in 50,000 buckets of four near twins, plus 2,000 exact copies (one row in the buckets), each
    in the right group. (Its speed is `benchmarks/preprocess.py`'s near-dedup figure, not a test.)"""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32, size=(50_000, 20), dtype=np.uint32)
    twins = np.repeat(base, 4, axis=0)
    twins[np.arange(len(twins)), 10 + np.arange(len(twins)) % 4] += 1  # one position apart, band 1
    sigs = np.vstack([twins, np.repeat(base[:1] ^ 1, 2_000, axis=0)])
    labels = minhash.duplicate_groups(sigs, BANDS, ROWS, 0.8)
    assert (labels[:200_000] == np.repeat(np.arange(0, 200_000, 4), 4)).all()
    assert (labels[200_000:] == 200_000).all()


def test_decontamination_catches_a_candidate_behind_a_dissimilar_bucket_head(monkeypatch):
    """The leak the rule closes: a train row heads the bucket, dissimilar to both a test row and the
    candidate that nearly repeats it; the candidate is dropped as a test overlap naming its twin."""
    from pipelines.data.preprocess import NearDedupConfig
    from pipelines.loop.decontaminate import TEST_OVERLAP, find_overlaps, reference_table

    reference = reference_table([{"id": "r0", "text": "train row", "split": "train"},
                                 {"id": "t1", "text": "test row", "split": "test"}], "test")
    monkeypatch.setattr(minhash, "signatures", lambda texts, *a, **k: _bucket_with_dissimilar_head())
    found = find_overlaps([("c1", "candidate")], reference, NearDedupConfig(threshold=0.8, num_perm=20, bands=2))
    assert found == {"c1": (TEST_OVERLAP, "near duplicate of test row t1")}
