"""Label drift of the loop's rewrites (``stages.loop.relabel: jury``): how often the jury's label of a
candidate differs from the label of the seed it was rewritten from. Pure functions.

A rewrite is asked to keep its seed's label (an unsafe seed's harmful intent phrased more implicitly,
a safe seed's rewrite harmless), but a generator can drift: an "implicit" rewrite that lost its harm
is a safe row carrying an unsafe label. The drift report measures that per generator (G0, G1, ...) and
per micro category of the seed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipelines.core.rows import SAFE, UNSAFE

#: changed candidates named per group in the report (ids, sorted)
EXAMPLES = 5


def _group() -> dict[str, Any]:
    return {"candidates": 0, "labelled": 0, "unlabelled": 0, "changed": 0, "unsafe_to_safe": 0,
            "safe_to_unsafe": 0, "share": None, "examples": []}


def label_drift(rows: Iterable[dict[str, Any]], examples: int = EXAMPLES) -> dict[str, Any]:
    """Drift of relabelled candidates. ``rows``: one per candidate, with ``id``, ``seed_label`` (its
    seed's label, which the candidate carried), ``jury_label`` (``""`` when the jury gave none),
    ``micro`` (the seed's micro category, ``""`` for none) and ``generator``.

    For a group g of candidates (all of them, one generator, or one micro category)::

        labelled(g) = |{c ∈ g : jury(c) ≠ ""}|
        changed(g)  = |{c ∈ g : jury(c) ≠ "" and jury(c) ≠ seed(c)}|
        share(g)    = changed(g) / labelled(g)            (None when labelled(g) = 0)

    Candidates the jury could not label are counted (``unlabelled``) and are not in the share.
    ``changed`` splits into ``unsafe_to_safe`` and ``safe_to_unsafe``; ``examples`` are the first
    ``examples`` changed ids in sorted order. Returns ``{"total": g, "by_generator": {G: g},
    "by_micro": {micro or "-": g}}``."""
    total = _group()
    by_generator: dict[str, dict[str, Any]] = {}
    by_micro: dict[str, dict[str, Any]] = {}
    changed_ids: dict[int, list[str]] = {}
    for row in rows:
        groups = (total, by_generator.setdefault(row["generator"] or "-", _group()),
                  by_micro.setdefault(row["micro"] or "-", _group()))
        seed, jury = row["seed_label"], row["jury_label"]
        for g in groups:
            g["candidates"] += 1
            if not jury:
                g["unlabelled"] += 1
                continue
            g["labelled"] += 1
            if jury != seed:
                g["changed"] += 1
                g["unsafe_to_safe"] += seed == UNSAFE and jury == SAFE
                g["safe_to_unsafe"] += seed == SAFE and jury == UNSAFE
                changed_ids.setdefault(id(g), []).append(row["id"])
    for g in (total, *by_generator.values(), *by_micro.values()):
        g["share"] = g["changed"] / g["labelled"] if g["labelled"] else None
        g["examples"] = sorted(changed_ids.get(id(g), []))[:examples]
    return {"total": total, "by_generator": dict(sorted(by_generator.items())),
            "by_micro": dict(sorted(by_micro.items()))}
