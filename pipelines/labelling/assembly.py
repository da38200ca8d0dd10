"""Dataset assembly (CHILLGuard §3.3): labelled sources -> train / test, statistics, dataset card, export.

- Jury-labelled rows (``inputs``) are split per stratum (micro category × label): within a stratum the
  distinct normalised texts are ordered by a seeded hash and the first ``round(test_share × n)`` go
  to test, so identical texts share a split and the choice does not depend on partitioning.
- External datasets (``external``: seed stages with their own labels) enter train only.
- Disjointness is enforced, not assumed: a train row whose id or normalised text is also in test is
  dropped (``overlaps_test``). Rows without a safe/unsafe label go to ``errors`` (``missing_label``).
- The stage folder gets ``dataset/``: ``data/{train,test}/*.parquet``, a Hugging Face ``datasets``
  folder (``hf/``, ``datasets.load_from_disk`` works), ``stats.json`` / ``stats.md`` (counts per
  source × split × label, the paper's Table 6, and per micro category) and ``README.md`` (the card).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import defaultdict
from typing import Any

import pyarrow as pa
from pydantic import Field

from pipelines.core.config import Strict
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.registry import References, register
from pipelines.core.rows import (
    DROPPED,
    ERROR,
    LINEAGE,
    OK,
    SAFE,
    SCHEMA_FIELDS,
    UNSAFE,
    shuffle_partitions,
    to_common_schema,
    to_table,
    union_all,
)
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage, col, run_pass
from pipelines.core.taxonomy import load_taxonomy
from pipelines.core.textnorm import normalize_text
from pipelines.labelling.jury import LABEL_COLUMNS
from pipelines.labelling.label_cost import audit_summary, cost_lines, labelling_cost
from pipelines.labelling.voting import LABELS


class AssembleConfig(Strict):
    """Merge labelled sources into train/test, stratified by micro category and label; export
    Parquet, a Hugging Face dataset, statistics and a dataset card."""

    inputs: list[str] = Field(min_length=1, description="labelled row stages (adjudicate)")
    external: list[str] = Field(default_factory=list,
                                description="seed stages (seeds_<key>) that enter train only")
    test_share: float = Field(0.2, gt=0, lt=1, description="share of each stratum in test")
    dataset_name: str = "chillguard-data"
    licenses: dict[str, str] = Field(
        default_factory=dict, description="source -> licence note for the dataset card")

log = logging.getLogger(__name__)

TRAIN, TEST = "train", "test"
DATASET_COLUMNS = {**LABEL_COLUMNS, "split": pa.string()}
_KEY = "text_key"
#: rows per partition of the stratum shuffle (see :func:`split_partitions`)
ROWS_PER_SPLIT_PARTITION = 50_000


def text_key(text: str) -> str:
    """What "the same text" means for disjointness: NFKC, whitespace-normalised, case-folded."""
    return hashlib.sha1(normalize_text(text or "", "nfkc").casefold().encode("utf-8")).hexdigest()


def to_dataset_rows(batch: pa.Table, *, external: str | None) -> pa.Table:
    """Rows of one source in the dataset schema, with their text key; ``external`` names the seed
    stage of an external dataset (its label is the dataset's own, its split is train)."""
    if external is not None:
        batch = to_common_schema(batch)
    out = []
    for row in batch.to_pylist():
        if external is not None:
            lineage = json.loads(row[LINEAGE] or "{}")
            row.update(source="external", decision="source", source_label=row["label"],
                       source_micro=row["micro"], split=TRAIN,
                       **{LINEAGE: json.dumps({**lineage, "dataset": external}, ensure_ascii=False)})
        extra = {k: row.pop(k) for k in list(row) if k not in SCHEMA_FIELDS and k not in DATASET_COLUMNS
                 and k not in ("status", "reason", "detail")}
        if extra:  # stage-specific lineage of the labelled rows stays, folded into `lineage`
            row[LINEAGE] = json.dumps({**json.loads(row.get(LINEAGE) or "{}"), **extra}, ensure_ascii=False,
                                      default=str)
        row[_KEY] = text_key(row["text"])
        if row["label"] not in LABELS:
            row.update(status=ERROR, reason="missing_label",
                       detail=f"label {row['label']!r} is not safe/unsafe")
        else:
            row.update(status=OK, reason="", detail="")
        out.append(row)
    return to_table(out, {**DATASET_COLUMNS, _KEY: pa.string()})


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def assign_split(group: pa.Table, *, test_share: float, seed: int) -> pa.Table:
    """One stratum: the first ``round(test_share × distinct texts)`` texts by seeded hash -> test."""
    keys = group.column(_KEY).to_pylist()
    status = group.column("status").to_pylist()
    distinct = sorted({k for k, s in zip(keys, status) if s == OK}, key=lambda k: _rank(seed, k))
    test = set(distinct[:int(test_share * len(distinct) + 0.5)])
    split = [(TEST if k in test else TRAIN) if s == OK else "" for k, s in zip(keys, status)]
    return group.set_column(group.column_names.index("split"), "split", pa.array(split, pa.string()))


def split_partitions(rows: int, micro_codes: int) -> int:
    """Partitions of the shuffle that brings each stratum together: one per
    :data:`ROWS_PER_SPLIT_PARTITION` rows, at most one per stratum a labelled row can have (micro code
    or none × safe/unsafe; a stratum is never split, so more partitions would stay empty). Ray's
    default (200) costs a task per empty partition; the split itself does not depend on it."""
    return shuffle_partitions(rows, ROWS_PER_SPLIT_PARTITION, most=2 * (micro_codes + 1))


def enforce_disjoint(batch: pa.Table, *, test_ids: frozenset, test_keys: frozenset) -> pa.Table:
    """Train rows sharing an id or a normalised text with a test row -> dropped (``overlaps_test``)."""
    rows = batch.to_pylist()
    for row in rows:
        if row["status"] == OK and row["split"] == TRAIN:
            clash = ("id" if row["id"] in test_ids else "text" if row[_KEY] in test_keys else None)
            if clash:
                row.update(status=DROPPED, reason="overlaps_test",
                           detail=f"same {clash} as a test row; train and test share neither")
    return to_table(rows, DATASET_COLUMNS)


# ------------------------------------------------------------------------------------------------
# Statistics and the card


def statistics(rundir: RunDir, stage: str) -> dict[str, Any]:
    """Counts per source × split × label and per micro category × split × label."""
    by_source: dict = defaultdict(lambda: defaultdict(lambda: {SAFE: 0, UNSAFE: 0}))
    by_micro: dict = defaultdict(lambda: defaultdict(lambda: {SAFE: 0, UNSAFE: 0}))
    splits = {TRAIN: 0, TEST: 0}
    for batch in rundir.iter_batches(stage, OK, ["source", "split", "label", "micro"]):
        columns = [batch.column(c).to_pylist() for c in ("source", "split", "label", "micro")]
        for source, split, label, micro in zip(*columns):
            by_source[source][split][label] += 1
            by_micro[micro or "-"][split][label] += 1
            splits[split] += 1
    def plain(d):
        return {k: {s: dict(v) for s, v in sorted(inner.items())} for k, inner in sorted(d.items())}

    return {"rows": splits, "by_source": plain(by_source), "by_micro": plain(by_micro),
            "dropped": rundir.reason_counts(stage, DROPPED), "errored": rundir.reason_counts(stage, ERROR)}


def _table(title: str, counts: dict) -> list[str]:
    lines = [f"| {title} | train safe | train unsafe | test safe | test unsafe | total |", "|---|---|---|---|---|---|"]
    for key, per_split in counts.items():
        cells = [per_split.get(s, {}).get(lab, 0) for s in (TRAIN, TEST) for lab in (SAFE, UNSAFE)]
        lines.append(f"| {key} | " + " | ".join(map(str, cells)) + f" | {sum(cells)} |")
    return lines


def statistics_markdown(stats: dict) -> str:
    lines = ["# Dataset statistics", "", f"Rows: train {stats['rows'][TRAIN]}, test {stats['rows'][TEST]}", "",
             "## Per source", "", *_table("source", stats["by_source"]), "",
             "## Per micro category", "", *_table("micro", stats["by_micro"]), ""]
    for kind in ("dropped", "errored"):
        if stats[kind]:
            lines += [f"## Rows {kind}", "", *(f"- {r}: {n}" for r, n in stats[kind].items()), ""]
    return "\n".join(lines)


LINEAGE_FIELDS = {
    "id": "stable content hash of the row",
    "text": "the prompt (normalised)",
    "lang": "language code from language identification",
    "label": "final label: safe / unsafe",
    "macro / micro": "risk category codes (A–E / A1–E2); for unsafe rows the micro code is the adjudicator's",
    "source": "rag (retrieval-augmented rewriting), pe (prompt-engineering rewrite), real (kept real "
              "prompt), external (public dataset, train only), gen (generator output)",
    "method": "how the text was made (rewriting method, loader, ...)",
    "parent_id": "the row it was derived from",
    "iteration": "generator–classifier loop iteration (0 for constructed data)",
    "lineage": "JSON: stage-specific provenance (retrieval query, retrieved ids, rewriting model, ...)",
    "votes": "every judge's vote: judge, model, raw answer, parsed verdict (empty = abstention)",
    "source_label / source_micro": "label and micro category before calibration",
    "decision": "majority (strict majority of valid votes), adjudicated (a tie, or fewer valid votes than "
                "the jury's quorum min_valid_votes), "
                "source (external datasets keep their own labels)",
    "flipped": "calibration changed the source label",
    "adjudicator / adjudicator_answers": "adjudicator model and its raw answers",
    "split": "train / test",
}


def dataset_card(*, name: str, config: AssembleConfig, stats: dict, taxonomy_path: str,
                 labelling: dict, agreement: dict | None, cost: dict | None = None,
                 audit: dict | None = None) -> str:
    taxonomy = load_taxonomy(taxonomy_path)
    lines = [f"# {name}", "",
             "A fine-grained Chinese safety dataset of user prompts labelled safe / unsafe under a "
             "5-macro / 31-micro risk taxonomy, built with chillguard (CHILLGuard method).", "",
             f"- train: {stats['rows'][TRAIN]} rows; test: {stats['rows'][TEST]} rows",
             "- load: `datasets.load_from_disk(\"hf\")` or the Parquet files under `data/`", "",
             "## Taxonomy", "", "| code | 名称 | name |", "|---|---|---|"]
    for macro in taxonomy.macros:
        lines.append(f"| **{macro.code}** | **{macro.zh}** | **{macro.en}** |")
        lines += [f"| {c.code} | {c.zh} | {c.en} |" for c in macro.micros]
    lines += ["", "## Sources and counts", "", *_table("source", stats["by_source"]), "",
              "Per micro category: see `stats.md` / `stats.json`.", "",
              "## How labels were decided", "",
              f"Every constructed row was labelled by a jury of {len(labelling.get('judges', []))} LLMs "
              f"({', '.join(labelling.get('judges', [])) or 'none'}); a label wins with a strict majority "
              "of the valid votes (answers that are not a verdict are abstentions)"
              + (f" once at least {labelling['min_valid_votes']} judges gave a valid vote"
                 if labelling.get("min_valid_votes") else "")
              + ". Ties and rows below the quorum were labelled by the adjudicator"
              f" ({labelling.get('adjudicator') or 'none'}), "
              "which also assigned the micro category of every unsafe row. External datasets keep their "
              "own labels and appear in train only."]
    if agreement:
        kappa = agreement.get("fleiss_kappa")
        lines += ["", f"Agreement: Fleiss' kappa {'undefined' if kappa is None else f'{kappa:.3f}'}; "
                      f"tie rate {agreement.get('tie_rate')}; adjudication rate {agreement.get('adjudication_rate')} "
                      "(details: the adjudicate stage's `agreement.md`)."]
    lines += cost_lines(cost, audit)
    lines += ["", "## Split", "",
              f"Stratified by micro category × label; {config.test_share:.0%} of each stratum's distinct "
              "texts go to test. Train and test share no id and no normalised text (enforced: train rows "
              f"that would overlap were dropped: {stats['dropped'].get('overlaps_test', 0)}).", "",
              "## Fields", "", "| field | meaning |", "|---|---|",
              *(f"| {k} | {v} |" for k, v in LINEAGE_FIELDS.items()), "",
              "## Licence notes", ""]
    notes = dict(config.licenses)
    lines += [f"- {source}: {note}" for source, note in sorted(notes.items())] or [
        "- No licence notes were given in the recipe (`stages.assemble.licenses`)."]
    lines += ["- External datasets remain under their own licences; check them before redistribution.",
              "- Constructed rows are model outputs derived from crawled text; they contain harmful "
              "content by design and are meant for safety research and guard training only.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The stage


class AssembleStage(Stage):
    name = "assemble"
    reads = frozenset({"id", "text", "label"})
    # the labelled rows with their labelling lineage and the split
    writes = PASSTHROUGH | frozenset(DATASET_COLUMNS)

    def __init__(self, config: AssembleConfig, taxonomy_path: str, seed: int, labelling: dict):
        super().__init__(config, inputs=(*config.inputs, *config.external))
        self.taxonomy_path = taxonomy_path
        self.taxonomy = load_taxonomy(taxonomy_path)  # the card lists the categories
        self.seed = seed
        self.labelling = labelling  # {"judges": [...], "adjudicator": ...} for the card

    def _rows(self, inputs: dict, names: list[str], external: bool):
        return union_all([inputs[n].map_batches(to_dataset_rows, batch_format="pyarrow",
                                                fn_kwargs={"external": n if external else None}) for n in names])

    def write(self, inputs: dict, rundir: RunDir) -> None:
        partitions = split_partitions(sum(rundir.count_rows(n, OK) for n in self.config.inputs),
                                      len(self.taxonomy.micro_codes))
        internal = self._rows(inputs, list(self.config.inputs), external=False) \
            .groupby(["micro", "label"], num_partitions=partitions) \
            .map_groups(assign_split, batch_format="pyarrow",
                        fn_kwargs={"test_share": self.config.test_share, "seed": self.seed})
        parts = [internal]
        if self.config.external:
            parts.append(self._rows(inputs, list(self.config.external), external=True))
        split = run_pass(self, rundir, "split", lambda: union_all(parts))
        test_ids, test_keys = set(), set()
        for batch in split.filter(expr=col("split") == TEST).select_columns(["id", _KEY]).iter_batches(
                batch_format="pyarrow"):
            test_ids.update(batch.column("id").to_pylist())
            test_keys.update(batch.column(_KEY).to_pylist())
        log.info("assemble: %d test rows; enforcing train/test disjointness", len(test_ids))
        split.map_batches(enforce_disjoint, batch_format="pyarrow",
                          fn_kwargs={"test_ids": frozenset(test_ids), "test_keys": frozenset(test_keys)}) \
            .write_parquet(rundir.uri(self.name), partition_cols=["status"])
        self.export(rundir)

    def export(self, rundir: RunDir) -> None:
        """Parquet per split, a Hugging Face dataset, statistics and the card under ``dataset/``."""
        import datasets
        import ray

        ok = ray.data.read_parquet(rundir.partition_uri(self.name, OK), partitioning=None) \
            .drop_columns(["reason", "detail"])
        for split in (TRAIN, TEST):
            ok.filter(expr=col("split") == split).write_parquet(rundir.uri(self.name, "dataset", "data", split))
        schema = to_table([], DATASET_COLUMNS).drop_columns(["status", "reason", "detail"]).schema
        # `datasets` reads and writes local files only: the splits are copied from the run directory
        # (a bucket too) to a local scratch folder, and the saved dataset is copied back
        with tempfile.TemporaryDirectory() as tmp:
            splits = {}
            for split in (TRAIN, TEST):
                files = rundir.download(f"{self.name}/dataset/data/{split}", f"{tmp}/data/{split}", ".parquet")
                splits[split] = (datasets.Dataset.from_parquet(files, cache_dir=f"{tmp}/cache") if files
                                 else datasets.Dataset(pa.Table.from_pylist([], schema)))
            datasets.DatasetDict(splits).save_to_disk(f"{tmp}/hf")
            rundir.upload(f"{tmp}/hf", f"{self.name}/dataset/hf")
        stats = statistics(rundir, self.name)
        rundir.write_text(f"{self.name}/dataset/stats.json", json.dumps(stats, indent=2, ensure_ascii=False))
        rundir.write_text(f"{self.name}/dataset/stats.md", statistics_markdown(stats))
        agreement = None
        for name in self.config.inputs:
            text = rundir.read_text(f"{name}/agreement.json")
            agreement = json.loads(text) if text else agreement
        rundir.write_text(f"{self.name}/dataset/README.md", dataset_card(
            name=self.config.dataset_name, config=self.config, stats=stats, taxonomy_path=self.taxonomy_path,
            labelling=self.labelling, agreement=agreement,
            cost=labelling_cost(rundir.read_manifest("jury"), rundir.read_manifest("adjudicate")),
            # an audit imported before this stage ran (`chillguard audit import`)
            audit=audit_summary(json.loads(rundir.read_text("audit/report.json") or "null"))))

    def summary(self, rundir: RunDir) -> dict[str, Any]:
        stats = json.loads(rundir.read_text(f"{self.name}/dataset/stats.json") or "{}")
        return {"rows": stats.get("rows"), "by_source": stats.get("by_source")}


def _build(recipe: Any, config: AssembleConfig) -> list[Stage]:
    jury, adjudicate = recipe.stages.jury, recipe.stages.adjudicate
    labelling = {"judges": [f"{j} ({recipe.models[j].model})" for j in (jury.judges if jury else [])],
                 "adjudicator": (f"{adjudicate.model} ({recipe.models[adjudicate.model].model})"
                                 if adjudicate else None),
                 "min_valid_votes": jury.quorum if jury else None}
    return [AssembleStage(config, recipe.taxonomy, recipe.seed, labelling)]


def _check(config: AssembleConfig, refs: References) -> dict[str, str | None]:
    refs.check_inputs("stages.assemble.inputs", config.inputs)
    bad = [n for n in config.external if not n.startswith("seeds_") or n not in refs.rows]
    if bad:
        raise ValueError(f"stages.assemble.external: {bad} are not enabled seed stages "
                         f"(seeds_<key>; enabled: {[n for n in refs.rows if n.startswith('seeds_')] or 'none'})")
    both = sorted(set(config.external) & set(config.inputs))
    if both:
        raise ValueError(f"stages.assemble: {both} is in both inputs and external")
    return {}


register("assemble", config=AssembleConfig, provides="rows", build=_build, check=_check)
