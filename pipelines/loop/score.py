"""Quality scores and difficulty levels of the loop's candidates (CHILLGuard §4.3, eq. 8).

Reads the candidates as the previous classifier labelled them (a guard-evaluation stage over the
candidates: ``pred_label`` is ŷ, ``label`` the seed's y*), asks the scorer (G0 in the paper) for a
quality score s ∈ [1, 5] (``configs/prompts/loop_quality.yaml``; answers held to one digit where
the endpoint accepts structured outputs) and gives each candidate its level
(:func:`pipelines.loop.levels.level_of`).

One-to-one: ``ok`` rows carry ``quality``, ``pred_label``, ``unsafe_score`` (the classifier's
P(unsafe)) and ``level``; a failed request or an answer without exactly one score in 1–5 is an
``error`` row (``unparseable_score``): that candidate is ineligible for pairs, counted, never guessed.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import pyarrow as pa

from actors.llm import chat
from pipelines.core.config import LLMEndpoint
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.parsing import classify_llm_error, strip_thinking
from pipelines.core.prompts import ChatPrompt
from pipelines.core.rows import ERROR, LINEAGE, OK, column_or_lineage, error_detail, to_common_schema, to_table
from pipelines.core.stage import Stage
from pipelines.loop.levels import QUALITY_THRESHOLD, level_of

SCORE_COLUMNS = {LINEAGE: pa.string(), "quality": pa.int32(), "pred_label": pa.string(),
                 "unsafe_score": pa.float64(), "level": pa.string(), "raw_output": pa.string()}
#: the answer the scorer is held to where structured outputs are accepted
SCORE_PATTERN = "[1-5]"


class ScoreParseError(ValueError):
    """A scorer answer without exactly one score in 1–5."""


#: a number with its sign: "-3", "−3" (U+2212) and "－4" (full width, NFKC-folded to "-") are negative;
#: a dash between two numbers is a range ("1-5"), not a sign
_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])[-−])?\d+(?:\.\d+)?")


def parse_quality(answer: str) -> int:
    """The score in a scorer answer: the only number in it, which must be an integer in 1–5 (``"4"``,
    ``"评分：4分"``). Signs are read (``-3`` is -3, not 3) and decimals are kept (``4.5``): neither is
    a score, and no number is ever rounded or clipped into range. Raises :class:`ScoreParseError`
    for no number, a number outside 1–5 or not whole, or different numbers."""
    text = unicodedata.normalize("NFKC", strip_thinking(answer or ""))
    numbers = {float(n.replace("−", "-")) for n in _NUMBER.findall(text)}
    if len(numbers) != 1:
        raise ScoreParseError(f"expected one score in 1-5, found {sorted(numbers) or 'none'} in {answer!r}")
    (score,) = numbers
    if score not in range(1, 6):
        raise ScoreParseError(f"score {score:g} is not a whole number in 1-5 in {answer!r}")
    return int(score)


class QualityPrompt:
    """Candidate row -> the scorer's messages (the seed, the candidate, the label it must keep)."""

    def __init__(self, path: str):
        self.prompt = ChatPrompt(path)

    def hash_payload(self) -> str:
        return self.prompt.digest

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompt.render({"seed": row["seed_text"], "text": row["text"], "label": row["label"]})


def to_score_rows(batch: pa.Table) -> pa.Table:
    """Labelled candidates -> the common schema plus ŷ, P(unsafe) and the seed text for the prompt."""
    own = batch.select([c for c in ("pred_label", "score", LINEAGE) if c in batch.column_names]).to_pylist()
    common = to_common_schema(batch)
    return (common.append_column("pred_label", pa.array([e.get("pred_label") or "" for e in own], pa.string()))
            .append_column("unsafe_score", pa.array([e.get("score") for e in own], pa.float64()))
            .append_column("seed_text", pa.array([str(column_or_lineage(e, "seed_text") or "") for e in own],
                                                 pa.string())))


def answers_to_levels(batch: pa.Table, *, threshold: int) -> pa.Table:
    out = []
    for r in batch.to_pylist():
        answer, error = r.pop("llm_output"), r.pop("llm_error")
        for key in ("llm_prompt_tokens", "llm_output_tokens", "seed_text"):
            r.pop(key, None)
        r = {**r, "raw_output": answer}
        try:
            if error:
                raise ScoreParseError(error)
            quality = parse_quality(answer)
        except ScoreParseError as exc:
            reason = classify_llm_error(error) if error else "unparseable_score"
            out.append({**r, "quality": 0, "level": "", "status": ERROR, "reason": reason,
                        "detail": error_detail(str(exc))})
            continue
        out.append({**r, "quality": quality,
                    "level": level_of(r["label"], r["pred_label"] or None, quality, threshold),
                    "status": OK, "reason": "", "detail": ""})
    table = to_table(out, SCORE_COLUMNS)
    # a missing classifier score stays null (to_table would make it 0)
    scores = pa.array([r.get("unsafe_score") for r in out], pa.float64())
    return table.set_column(table.column_names.index("unsafe_score"), "unsafe_score", scores)


class ScoreStage(Stage):
    """``loop<i>_score``: quality score and level of every labelled candidate."""

    def __init__(self, name: str, *, inputs: tuple[str, ...], endpoint: LLMEndpoint, template: str,
                 threshold: int = QUALITY_THRESHOLD):
        super().__init__(name=name, inputs=inputs)
        # candidates as a classifier labelled them (ŷ), with the seed each was rewritten from
        self.reads = frozenset({"id", "text", "label", "pred_label", "seed_text"})
        self.writes = PASSTHROUGH | frozenset(SCORE_COLUMNS)
        self.endpoint = endpoint
        self.prompt = QualityPrompt(template)
        self.threshold = threshold

    def build(self, inputs: dict) -> Any:
        from pipelines.core.rows import union_all

        rows = union_all([inputs[n].map_batches(to_score_rows, batch_format="pyarrow") for n in self.inputs])
        answers = chat(rows, self.endpoint, self.prompt, {"regex": SCORE_PATTERN})
        return answers.map_batches(answers_to_levels, batch_format="pyarrow", fn_kwargs={"threshold": self.threshold})

    def summary(self, rundir) -> dict[str, Any]:
        from collections import Counter

        return {"levels": dict(sorted(Counter(rundir.column_values(self.name, OK, "level")).items())),
                "quality": dict(sorted(Counter(rundir.column_values(self.name, OK, "quality")).items())),
                "ineligible": rundir.reason_counts(self.name, ERROR)}

