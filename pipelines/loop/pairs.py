"""Preference pairs P(i) of the loop (CHILLGuard §4.3, eq. 9) for the generator's MDPO training.

Fan-out over the seed stages' rows: each training seed gives up to ``max_pairs_per_seed`` pairs of
its own candidates (:func:`pipelines.loop.levels.make_pairs`), ``parent_id`` = the seed's id, or one
``dropped`` row saying why it gave none (``no_candidates``, ``no_eligible_candidates``,
``only_L2_L3``, ``no_valid_pair``); held-out rows are ``dropped`` (``held_out_split``).

A pair row holds what MDPO trains on: ``system`` and ``prompt`` (the generator's messages for the
seed, rendered with the same templates that generated the candidates), ``chosen`` and ``rejected``
(the two candidates' texts), and its lineage: ``chosen_id`` / ``rejected_id``, their levels,
quality scores and the classifier's predictions, and ``pair_type`` (``<L1,L4>``).

Accounting. The candidates are every row the labelling stage read: the scored ones (the score
stage's ``ok`` rows, with a level), the unscored ones (its ``error`` rows) and those the classifier
gave no usable answer for (the labelling stage's ``error`` rows, which never reach scoring). Every
candidate is in exactly one of (:func:`seed_accounting`)::

    candidates = paired + Σ unpaired[level] + Σ ineligible[reason]

``ineligible`` reasons: ``no_score:<score error>``, ``no_prediction:<labelling error>``, ``held_out_seed``
(a candidate of a held-out row), ``orphan`` (its seed is not among the inputs: it has no seed row to
be counted on). Every row of a seed (its pairs or its dropped row) carries the seed's accounting as
JSON in ``accounting``; the totals, orphans included, are ``RUN_DIR/<stage>/accounting.json`` and the
manifest's summary.

Relabelled rewrites (``relabelled``: the stage giving the jury's labels, ``stages.loop.relabel: jury``).
y* is the jury's label of each candidate, so its level is recomputed from C1's prediction and its
quality score (:func:`pipelines.loop.levels.level_of`); a candidate the jury could not label is
ineligible (``no_jury_label:<why>``: :func:`pipelines.loop.relabel.jury_outcome`, ``not_relabelled``
when the jury has no row of it). The pairs are made with the jury's labels; the seed's-label version
of the same candidates is computed beside it, tie-broken by the same seeded shuffle, and kept in the
accounting for comparison: ``levels`` and ``pair_types`` of both, the seed-label version under
``seed_label`` (it adds up the same way).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from pipelines.core.rows import (
    COMMON_COLUMNS,
    DROPPED,
    ERROR,
    LINEAGE,
    OK,
    column_or_lineage,
    content_id,
    keyed_rng,
    make_row,
    shuffle_partitions,
    to_common_schema,
    to_table,
    union_all,
)
from pipelines.core.stage import Stage, col, read_ok
from pipelines.loop.generate import GENERATED, RewritePrompt
from pipelines.loop.levels import QUALITY_THRESHOLD, level_of, make_pairs, no_pair_reason
from pipelines.loop.relabel import jury_outcome

PAIR_COLUMNS = {
    LINEAGE: pa.string(), "system": pa.string(), "prompt": pa.string(), "chosen": pa.string(),
    "rejected": pa.string(), "chosen_id": pa.string(), "rejected_id": pa.string(),
    "chosen_level": pa.string(), "rejected_level": pa.string(), "pair_type": pa.string(),
    "chosen_quality": pa.int32(), "rejected_quality": pa.int32(), "chosen_pred": pa.string(),
    "rejected_pred": pa.string(), "levels": pa.string(), "accounting": pa.string(),
}
ACCOUNTING = "accounting.json"  # the totals, in the stage's folder
_GROUP = "_seed"  # the seed id a row belongs to, for the groupby
_KIND = "_kind"   # seed / candidate / jury (a candidate's jury label, when relabelled)
_WHY = "_ineligible"  # why a candidate has no level ("" when it has one)
_ROLE_COLUMNS = {_GROUP: pa.string(), _KIND: pa.string(), "split": pa.string(), "level": pa.string(),
                 "quality": pa.int32(), "pred_label": pa.string(), _WHY: pa.string()}
#: why a candidate is ineligible: the scorer gave no score / the classifier no usable answer (each
#: prefixes the error's reason), its seed is a held-out row, its seed is not among the inputs
NO_SCORE, NO_PREDICTION, HELD_OUT_SEED, ORPHAN = "no_score", "no_prediction", "held_out_seed", "orphan"
#: why a candidate is ineligible when relabelled: the jury gave it no label (prefixes why)
NO_JURY_LABEL, NOT_RELABELLED = "no_jury_label", "not_relabelled"
# ORPHAN is also the status of an orphan group's row: counted, never written (its parent_id is no
# input id, so the runner's lineage check would call it invented)


def seed_markers(batch: pa.Table) -> pa.Table:
    """Seed-stage rows -> one marker row per seed (common schema + its split)."""
    splits = [column_or_lineage(r, "split") or "" for r in
              batch.select([c for c in ("split", LINEAGE) if c in batch.column_names]).to_pylist()]
    common = to_common_schema(batch)
    n = batch.num_rows
    return (common.append_column(_GROUP, common.column("id")).append_column(_KIND, pa.array(["seed"] * n))
            .append_column("split", pa.array(splits, pa.string())).append_column("level", pa.array([""] * n))
            .append_column("quality", pa.array([0] * n, pa.int32()))
            .append_column("pred_label", pa.array([""] * n, pa.string()))
            .append_column(_WHY, pa.array([""] * n, pa.string())))


def candidate_markers(batch: pa.Table, *, ineligible: str = "") -> pa.Table:
    """Candidates -> rows of their seed's group. ``ineligible=""``: the score stage's ``ok`` rows,
    with their level (one without a level has no prediction); else error rows of the score stage
    (:data:`NO_SCORE`) or of the labelling stage (:data:`NO_PREDICTION`), ineligible with
    ``<ineligible>:<their reason>`` (their ``level`` column, if any, is not a difficulty level)."""
    n = batch.num_rows
    common = to_common_schema(batch)
    scored = not ineligible
    level = batch.column("level") if scored else pa.array([""] * n, pa.string())
    quality = batch.column("quality").cast(pa.int32()) if scored else pa.array([0] * n, pa.int32())
    pred = batch.column("pred_label") if "pred_label" in batch.column_names else pa.array([""] * n, pa.string())
    if scored:
        why = ["" if lv else NO_PREDICTION for lv in level.to_pylist()]
    else:
        why = [f"{ineligible}:{reason}" for reason in batch.column("reason").to_pylist()]
    return (common.append_column(_GROUP, common.column("parent_id")).append_column(_KIND, pa.array(["candidate"] * n))
            .append_column("split", pa.array([""] * n, pa.string())).append_column("level", level)
            .append_column("quality", quality).append_column("pred_label", pred)
            .append_column(_WHY, pa.array(why, pa.string())))


def jury_markers(batch: pa.Table, *, status: str) -> pa.Table:
    """Rows of the relabelling stage (``ok`` or ``error``) -> one ``jury`` marker per candidate in its
    seed's group: ``label`` the jury's label (``""`` when none) and :data:`_WHY` why it has none."""
    n = batch.num_rows
    common = to_common_schema(batch)
    outcomes = [jury_outcome(r, status) for r in batch.select(
        [c for c in ("label", "reason") if c in batch.column_names]).to_pylist()]
    common = common.set_column(common.column_names.index("label"), "label",
                               pa.array([label for label, _ in outcomes], pa.string()))
    return (common.append_column(_GROUP, common.column("parent_id")).append_column(_KIND, pa.array(["jury"] * n))
            .append_column("split", pa.array([""] * n, pa.string())).append_column("level", pa.array([""] * n))
            .append_column("quality", pa.array([0] * n, pa.int32()))
            .append_column("pred_label", pa.array([""] * n, pa.string()))
            .append_column(_WHY, pa.array([why for _, why in outcomes], pa.string())))


def relabelled(candidate: dict[str, Any], jury: dict[str, Any] | None, threshold: int) -> dict[str, Any]:
    """A candidate marker with the jury's label as y* and its level by it; ineligible
    (:data:`NO_JURY_LABEL`) when the jury gave none. Already ineligible: as it is."""
    if candidate[_WHY]:
        return candidate
    if jury is None or jury[_WHY]:
        why = NOT_RELABELLED if jury is None else jury[_WHY]
        return {**candidate, "level": "", _WHY: f"{NO_JURY_LABEL}:{why}"}
    level = level_of(jury["label"], candidate["pred_label"] or None, candidate["quality"], threshold)
    return {**candidate, "label": jury["label"], "level": level}


def seed_accounting(candidates: Iterable[dict[str, Any]], pairs: list,
                    ineligible: str | None = None) -> dict[str, Any]:
    """Where one seed's candidate markers went: ``paired`` (2 per pair), ``unpaired`` (eligible ones
    in no pair, by level), ``ineligible`` (by reason; all of them with reason ``ineligible`` when
    given: a held-out seed, an orphan group). ``candidates = paired + Σ unpaired + Σ ineligible``."""
    in_pairs = {cid for p in pairs for cid in (p.chosen, p.rejected)}
    unpaired: Counter = Counter()
    why: Counter = Counter()
    n = 0
    for c in candidates:
        n += 1
        if ineligible or c[_WHY]:
            why[ineligible or c[_WHY]] += 1
        elif c["id"] not in in_pairs:
            unpaired[c["level"]] += 1
    return {"candidates": n, "paired": len(in_pairs), "unpaired": dict(sorted(unpaired.items())),
            "ineligible": dict(sorted(why.items()))}


def compared_accounting(candidates: list[dict[str, Any]], pairs: list, seed_label: list[dict[str, Any]],
                        seed_label_pairs: list, ineligible: str | None = None) -> dict[str, Any]:
    """With relabelling: :func:`seed_accounting` of the jury-label version, with its ``levels`` (by
    level, ``ineligible``) and ``pair_types``, and the same of the seed-label version under ``seed_label``."""
    def version(markers: list[dict[str, Any]], made: list) -> dict[str, Any]:
        levels = Counter("ineligible" if ineligible or c[_WHY] else c["level"] for c in markers)
        return {**seed_accounting(markers, made, ineligible), "levels": dict(sorted(levels.items())),
                "pair_types": dict(sorted(Counter(p.type for p in made).items()))}

    return {**version(candidates, pairs), "seed_label": version(seed_label, seed_label_pairs)}


def accounting_totals(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The accounting of every seed (and orphan group) summed, from the stage's rows (each with
    ``parent_id``, ``status`` and ``accounting``; a seed's pair rows repeat it, counted once):
    ``seeds`` (groups with a seed row), ``candidates``, ``paired``, ``unpaired``, ``ineligible``."""
    per_group = {r["parent_id"]: (r["status"], json.loads(r["accounting"])) for r in rows}
    totals: dict[str, Any] = {"candidates": 0, "paired": 0, "unpaired": {}, "ineligible": {}}
    for _, acc in per_group.values():
        _add(totals, acc)
    return {"seeds": sum(status != ORPHAN for status, _ in per_group.values()), **totals}


def _add(into: dict[str, Any], acc: dict[str, Any]) -> None:
    """``acc`` added into ``into`` key by key (counts summed, nested counts too), keys sorted."""
    for key, value in acc.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value
    for key in sorted(into):
        into[key] = into.pop(key)


def seed_pairs(group: pa.Table, *, seed: int, max_pairs: int | None, split: str | None, iteration: int,
               prompt: RewritePrompt, relabel: bool = False, threshold: int = QUALITY_THRESHOLD) -> pa.Table:
    """One seed's group (its marker + its candidates) -> its pair rows or one dropped row, each with
    the seed's accounting; a group without a seed (orphans) -> one :data:`ORPHAN` row counting them.
    ``relabel``: the group holds the candidates' ``jury`` markers too, y* is the jury's label
    (:func:`relabelled`), and the accounting compares with the seed's label (:func:`compared_accounting`)."""
    rows = group.to_pylist()
    seeds = [r for r in rows if r[_KIND] == "seed"]
    candidates = {r["id"]: r for r in rows if r[_KIND] == "candidate"}
    by_seed_label = list(candidates.values())
    if relabel:
        jury = {r["id"]: r for r in rows if r[_KIND] == "jury"}
        candidates = {cid: relabelled(c, jury.get(cid), threshold) for cid, c in candidates.items()}

    def accounting_of(pairs: list, ineligible: str | None = None, seed_label_pairs: list | None = None) -> str:
        if not relabel:
            return json.dumps(seed_accounting(candidates.values(), pairs, ineligible))
        return json.dumps(compared_accounting(list(candidates.values()), pairs, by_seed_label,
                                              seed_label_pairs or [], ineligible))

    if not seeds:  # candidates of a row that is not among the inputs: counted, not written
        group_id = rows[0][_GROUP]
        return to_table([make_row(id=group_id, parent_id=group_id, status=ORPHAN, reason=ORPHAN,
                                  accounting=accounting_of([], ORPHAN))], PAIR_COLUMNS)
    s = seeds[0]
    base = dict(label=s["label"], macro=s["macro"], micro=s["micro"], lang=s["lang"], source=GENERATED,
                method="loop_pair", parent_id=s["id"], iteration=iteration)
    if split is not None and s["split"] and s["split"] != split:
        return to_table([make_row(id=s["id"], text=s["text"], **base, status=DROPPED, reason="held_out_split",
                                  detail=f"split {s['split']!r}; seeds are {split!r}",
                                  accounting=accounting_of([], HELD_OUT_SEED))], PAIR_COLUMNS)
    levels = [r["level"] or None for r in candidates.values()]
    level_counts = dict(sorted(Counter(level or "ineligible" for level in levels).items()))
    pairs = make_pairs([(cid, r["level"] or None) for cid, r in candidates.items()], max_pairs,
                       keyed_rng(seed, "loop_pairs", s["id"]))
    # the comparison: the same candidates with the seed's label, tie-broken by the same shuffle
    seed_label_pairs = make_pairs([(c["id"], c["level"] or None) for c in by_seed_label], max_pairs,
                                  keyed_rng(seed, "loop_pairs", s["id"])) if relabel else []
    accounting = accounting_of(pairs, None, seed_label_pairs)
    if not pairs:
        return to_table([make_row(id=s["id"], text=s["text"], **base, status=DROPPED, reason=no_pair_reason(levels),
                                  detail=f"candidate levels {level_counts}", levels=str(level_counts),
                                  accounting=accounting)], PAIR_COLUMNS)
    messages = prompt({"text": s["text"], "label": s["label"], "micro": s["micro"]})
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = next(m["content"] for m in messages if m["role"] == "user")
    out = []
    for p in pairs:
        chosen, rejected = candidates[p.chosen], candidates[p.rejected]
        out.append(make_row(
            id=content_id(p.chosen, p.rejected), text=s["text"], **base, system=system, prompt=user,
            chosen=chosen["text"], rejected=rejected["text"], chosen_id=p.chosen, rejected_id=p.rejected,
            chosen_level=p.chosen_level, rejected_level=p.rejected_level, pair_type=p.type,
            chosen_quality=chosen["quality"], rejected_quality=rejected["quality"],
            chosen_pred=chosen["pred_label"], rejected_pred=rejected["pred_label"], levels=str(level_counts),
            accounting=accounting))
    return to_table(out, PAIR_COLUMNS)


class PairsStage(Stage):
    """``loop<i>_pairs``: MDPO preference pairs from the scored candidates, per seed."""

    fan_out = True

    def __init__(self, name: str, *, inputs: tuple[str, ...], scored: str, prompt: RewritePrompt, seed: int,
                 max_pairs: int | None, seed_split: str | None, iteration: int, labelled: str | None = None,
                 relabelled: str | None = None, threshold: int = QUALITY_THRESHOLD):
        super().__init__(name=name, inputs=inputs,
                         requires=(scored, *(s for s in (labelled, relabelled) if s)))
        # the labelled seeds and the scored candidates (and, relabelled, the jury's label of each)
        self.reads = {**{name: frozenset({"id", "text", "label"}) for name in inputs},
                      scored: frozenset({"id", "text", "parent_id", "level", "quality"}),
                      **({relabelled: frozenset({"id", "parent_id", "label"})} if relabelled else {})}
        self.writes = COMMON_COLUMNS | frozenset(PAIR_COLUMNS)
        self.scored = scored
        self.labelled = labelled  # its error rows: candidates without a prediction, which scoring never saw
        self.prompt = prompt
        self.seed = seed
        self.max_pairs = max_pairs
        self.seed_split = seed_split
        self.iteration = iteration
        self.relabelled = relabelled  # the stage whose label is y* (stages.loop.relabel: jury)
        # s >= it is a good rewrite: the levels by the jury's label need it (without relabelling the
        # score stage gave the levels)
        self.threshold = threshold if relabelled else None

    def hash_payload(self) -> dict[str, Any]:
        payload = super().hash_payload()
        for key in ("relabelled", "threshold"):  # unset (relabel off): the hash runs made before relabelling have
            if payload[key] is None:
                del payload[key]
        return payload

    def write(self, inputs: dict, rundir) -> None:
        import ray

        parts = [inputs[n].map_batches(seed_markers, batch_format="pyarrow") for n in self.inputs]
        parts.append(read_ok(rundir, self.scored).map_batches(candidate_markers, batch_format="pyarrow"))
        for stage, why in ((self.scored, NO_SCORE), (self.labelled, NO_PREDICTION)):
            if stage and rundir.parquet_files(stage, ERROR):
                parts.append(ray.data.read_parquet(rundir.partition_uri(stage, ERROR), partitioning=None)
                             .map_batches(candidate_markers, batch_format="pyarrow", fn_kwargs={"ineligible": why}))
        if self.relabelled:
            for status in (OK, ERROR):
                if rundir.parquet_files(self.relabelled, status):
                    uri = rundir.partition_uri(self.relabelled, status)
                    parts.append(ray.data.read_parquet(uri, partitioning=None).map_batches(
                        jury_markers, batch_format="pyarrow", fn_kwargs={"status": status}))
        rows = union_all(parts).materialize()
        out = rows.groupby(_GROUP, num_partitions=shuffle_partitions(rows.count())).map_groups(
            seed_pairs, batch_format="pyarrow", fn_kwargs={
                "seed": self.seed, "max_pairs": self.max_pairs, "split": self.seed_split,
                "iteration": self.iteration, "prompt": self.prompt, "relabel": bool(self.relabelled),
                **({"threshold": self.threshold} if self.relabelled else {})}).materialize()
        out.filter(expr=col("status") != ORPHAN).write_parquet(rundir.uri(self.name), partition_cols=["status"])
        totals = accounting_totals(out.select_columns(["parent_id", "status", "accounting"]).iter_rows())
        rundir.write_text(f"{self.name}/{ACCOUNTING}", json.dumps(totals, indent=2))

    def summary(self, rundir) -> dict[str, Any]:
        by_micro: dict[str, Counter] = {}
        for micro, kind in zip(rundir.column_values(self.name, OK, "micro"),
                               rundir.column_values(self.name, OK, "pair_type")):
            by_micro.setdefault(micro or "-", Counter())[kind] += 1
        return {"pairs": rundir.count_rows(self.name, OK),
                "pair_types": dict(sorted(Counter(rundir.column_values(self.name, OK, "pair_type")).items())),
                "seeds_with_pairs": len(set(rundir.column_values(self.name, OK, "parent_id"))),
                "no_pair": rundir.reason_counts(self.name, DROPPED),
                "accounting": json.loads(rundir.read_text(f"{self.name}/{ACCOUNTING}") or "null"),
                "pair_types_by_micro": {m: dict(c) for m, c in sorted(by_micro.items())}}
