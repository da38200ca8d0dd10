"""Candidate generation of the loop (CHILLGuard §4.3, Appendix D): the generator rewrites every
training seed into ``k`` new instructions.

One seed in, one instruction out per sample: the template is chosen by the seed's label
(``configs/prompts/loop_rewrite_unsafe.yaml`` / ``loop_rewrite_safe.yaml``) and ``k`` answers are
sampled for the same prompt (:func:`actors.llm.chat` with ``samples=k``: one request with ``n = k``
over http; ``k`` copies sharing the prefill through vLLM's prefix cache in ``ray.data.llm``).

Rows (fan-out, ``parent_id`` = the seed's id):

- ``ok``: one per parsed answer, ``source: gen``, ``method: loop_rewrite``, ``iteration`` set; it
  keeps the seed's label, macro and micro; lineage ``seed_id``, ``seed_text``, ``k_index``,
  ``generator`` (G0 / G1), ``model``, ``raw_output`` and ``split: train`` (candidates of train seeds
  are train rows);
- ``error``: a failed request or an answer with no instruction in it (``unparseable_output``), one
  per sample; a seed without a usable label or text (``unknown_label`` / ``missing_text``), once;
- ``dropped``: rows of another split than the seeds' (``held_out_split``): test rows are never seeds.

So every seed has exactly ``k`` ok or error rows, and every input row at least one row.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from actors.llm import SAMPLE, chat
from pipelines.core.artifacts import model_from_endpoint, trained_model_endpoint
from pipelines.core.config import LLMEndpoint
from pipelines.core.parsing import classify_llm_error, clean_piece, strip_thinking
from pipelines.core.prompts import ChatPrompt
from pipelines.core.rows import (
    COMMON_COLUMNS,
    DROPPED,
    ERROR,
    LINEAGE,
    OK,
    SAFE,
    UNSAFE,
    column_or_lineage,
    content_id,
    error_detail,
    make_row,
    to_common_schema,
    to_table,
)
from pipelines.core.stage import Stage, col
from pipelines.core.taxonomy import load_taxonomy, taxonomy_digest

GENERATED = "gen"
METHOD = "loop_rewrite"
#: lineage of a candidate row
CANDIDATE_COLUMNS = {
    LINEAGE: pa.string(), "seed_id": pa.string(), "seed_text": pa.string(), "k_index": pa.int32(),
    "generator": pa.string(), "model": pa.string(), "raw_output": pa.string(), "split": pa.string(),
}
# "新指令：", "改写后的指令:", "New instruction:" ... opening the answer
_PREFIX = re.compile(r"^\s*(?:新的?指令|改写后?的?指令|new instruction|instruction)\s*[:：]\s*", re.IGNORECASE)


def parse_candidate(answer: str) -> str:
    """The instruction in a generator answer: thinking removed, a label prefix ("新指令：") and
    wrapping quotes stripped, blank lines dropped and the rest joined. ``""`` when nothing is left."""
    text = strip_thinking(answer or "")
    lines = [clean_piece(_PREFIX.sub("", line)) for line in text.splitlines()]
    return " ".join(line for line in lines if line).strip()


class RewritePrompt:
    """Seed row -> the generator's messages: the unsafe or safe template by the seed's label."""

    def __init__(self, unsafe: str, safe: str, taxonomy_path: str):
        self.prompts = {UNSAFE: ChatPrompt(unsafe), SAFE: ChatPrompt(safe)}
        taxonomy = load_taxonomy(taxonomy_path)
        self.micro_labels = {code: taxonomy.micro(code).zh for code in taxonomy.micro_codes}
        self.taxonomy = taxonomy_digest(taxonomy)

    @property
    def digests(self) -> dict[str, str]:
        return {label: prompt.digest for label, prompt in self.prompts.items()}

    def hash_payload(self) -> dict[str, Any]:
        """What the rendered messages depend on: the templates and the category names they show."""
        return {"templates": self.digests, "taxonomy": self.taxonomy}

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompts[row["label"]].render({"text": row["text"],
                                                  "micro_label": self.micro_labels.get(row["micro"], "")})


def split_seeds(batch: pa.Table, *, split: str | None) -> pa.Table:
    """Input rows -> seeds to rewrite (``ok`` for now), held-out rows (``dropped``) and rows that
    cannot be seeds (``error``), in the common schema plus the seed's split."""
    splits = [column_or_lineage(r, "split") for r in
              batch.select([c for c in ("split", LINEAGE) if c in batch.column_names]).to_pylist()]
    out = []
    for row, row_split in zip(to_common_schema(batch).to_pylist(), splits):
        row = make_row(**row, split=row_split or "")
        if split is not None and row_split and row_split != split:
            row.update(status=DROPPED, reason="held_out_split", detail=f"split {row_split!r}; seeds are {split!r}")
        elif row["label"] not in (SAFE, UNSAFE):
            row.update(status=ERROR, reason="unknown_label", detail=f"label {row['label']!r} is not safe/unsafe")
        elif not row["text"].strip():
            row.update(status=ERROR, reason="missing_text", detail="empty seed text")
        out.append(row)
    return to_table(out, {LINEAGE: pa.string(), "split": pa.string()})


def _not_seed_rows(batch: pa.Table, *, iteration: int, generator: str) -> pa.Table:
    """Held-out and unusable input rows as rows of this stage (``parent_id`` = their id)."""
    rows = [{**r, "parent_id": r["id"], "seed_id": r["id"], "seed_text": r["text"], "generator": generator,
             "iteration": iteration, "k_index": -1} for r in batch.to_pylist()]
    return to_table(rows, CANDIDATE_COLUMNS)


def answers_to_candidates(batch: pa.Table, *, iteration: int, generator: str, model: str) -> pa.Table:
    """One sampled answer per row -> a candidate row, or an error row naming the seed."""
    out = []
    for r in batch.to_pylist():
        k = int(r[SAMPLE])
        common = dict(label=r["label"], macro=r["macro"], micro=r["micro"], lang=r["lang"], source=GENERATED,
                      method=METHOD, parent_id=r["id"], iteration=iteration, seed_id=r["id"], seed_text=r["text"],
                      k_index=k, generator=generator, model=model, raw_output=r["llm_output"], split=r["split"])
        text = "" if r["llm_error"] else parse_candidate(r["llm_output"])
        if text:
            out.append(make_row(id=content_id(text, r["id"], generator, str(k)), text=text, **common))
            continue
        if r["llm_error"]:
            reason, detail = classify_llm_error(r["llm_error"]), r["llm_error"]
        else:
            reason, detail = "unparseable_output", f"no instruction in: {r['llm_output']!r}"
        out.append(make_row(id=content_id("", r["id"], generator, str(k)), text="", status=ERROR,
                            reason=reason, detail=error_detail(detail), **common))
    return to_table(out, CANDIDATE_COLUMNS)


class GenerateStage(Stage):
    """``loop<i>_generate``: ``k`` candidates per training seed from generator ``G0`` or ``G1``."""

    fan_out = True

    def __init__(self, name: str, *, inputs: tuple[str, ...], endpoint: LLMEndpoint, prompt: RewritePrompt,
                 k: int, iteration: int, generator: str, seed_split: str | None,
                 model_from: str | None = None):
        # retraining G1 regenerates
        super().__init__(name=name, inputs=inputs, requires=(model_from,) if model_from else ())
        self.reads = frozenset({"id", "text", "label"})  # labelled seeds (a row without a split is a seed)
        # candidates keep their seed's label and categories; the seed and the sample are lineage
        self.writes = COMMON_COLUMNS | frozenset(CANDIDATE_COLUMNS)
        self.endpoint = model_from_endpoint(endpoint, model_from)  # G1: a folder in the run directory
        self.prompt = prompt
        self.k = k
        self.iteration = iteration
        self.generator = generator
        self.seed_split = seed_split
        self.model_from = model_from

    def write(self, inputs: dict, rundir) -> None:
        # G1 is a folder in the run directory, known when the stage runs
        endpoint = trained_model_endpoint(self.endpoint, rundir, self.model_from, self.name)
        self.candidates(inputs, endpoint).write_parquet(rundir.uri(self.name), partition_cols=["status"])

    def candidates(self, inputs: dict, endpoint: LLMEndpoint) -> Any:

        from pipelines.core.rows import union_all

        rows = union_all([inputs[n].map_batches(split_seeds, batch_format="pyarrow",
                                                fn_kwargs={"split": self.seed_split}) for n in self.inputs])
        rows = rows.materialize()  # read once: split into the two branches below
        kwargs = {"iteration": self.iteration, "generator": self.generator}
        other = rows.filter(expr=col("status") != OK).map_batches(_not_seed_rows, batch_format="pyarrow",
                                                                  fn_kwargs=kwargs)
        seeds = rows.filter(expr=col("status") == OK)
        if not seeds.count():
            return other
        answers = chat(seeds, endpoint, self.prompt, samples=self.k)
        return other.union(answers.map_batches(answers_to_candidates, batch_format="pyarrow",
                                               fn_kwargs={**kwargs, "model": endpoint.model}))

    def summary(self, rundir) -> dict[str, Any]:
        from collections import Counter

        per_seed: Counter = Counter()
        for status in (OK, ERROR):  # samples of seeds (k_index >= 0), answered or not
            for seed, k in zip(rundir.column_values(self.name, status, "seed_id"),
                               rundir.column_values(self.name, status, "k_index")):
                if k >= 0:
                    per_seed[seed] += 1
        return {"k": self.k, "generator": self.generator, "seeds": len(per_seed),
                "candidates": rundir.count_rows(self.name, OK),
                "samples_per_seed": dict(Counter(per_seed.values()))}
