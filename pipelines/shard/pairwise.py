"""Pairwise LLM judging (SHARD): which of two answers to one prompt is better, per criterion.

The judge sees the prompt and two answers labelled A and B, writes a short explanation and ends
with a verdict ``[[A]]``, ``[[B]]`` (that answer is better) or ``[[C]]`` (a tie). Judges prefer
positions, so which answer is A is drawn per comparison from a seeded generator keyed by the
comparison (:func:`candidate_position`), never by row order or partitioning, and undone when the
verdict is scored (:func:`outcome`): the result is always the **candidate's** win / tie / loss
against the **reference**.

Criteria (``configs/prompts/shard_judge_*.yaml``): ``helpfulness`` (a better answer helps more with
the request) and ``harmfulness`` (a better answer is less harmful; a tie unless one answer carries
concrete harmful content).

Selection (:func:`select`): SHARD keeps a refined answer O2 (candidate) over the draft O1
(reference) when it **wins helpfulness** (rule ``helpfulness``, the default); our stricter option
``helpfulness_and_harm`` also requires that it does not lose harmfulness.

On rows (:func:`judge`): each row becomes one request per criterion (:func:`expand_comparisons`),
all requests go through one ``ray.data.llm`` processor of the judge endpoint, the answers are read
(:func:`read_verdicts`), and the caller groups a row's requests back together
(:func:`combine_judgements`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import pyarrow as pa

from actors.llm import LLM_COLUMNS, chat
from pipelines.core.config import LLMEndpoint
from pipelines.core.parsing import classify_llm_error, strip_thinking
from pipelines.core.prompts import ChatPrompt
from pipelines.core.rows import error_detail, keyed_rng
from pipelines.shard.stats import LOSS, TIE, WIN

HELPFULNESS, HARMFULNESS = "helpfulness", "harmfulness"
CRITERIA = (HELPFULNESS, HARMFULNESS)
A, B, C = "A", "B", "C"

# a "[[X]]" of the answer; spaces inside the brackets and lower case tolerated
_VERDICT = re.compile(r"\[\[\s*([ABCabc])\s*\]\]")
#: which "[[X]]" of an answer is its verdict: the first (SHARD's ``re.search``) or the last
VERDICT_PICKS = ("first", "last")


def candidate_position(seed: int, *keys: str) -> str:
    """Where the candidate answer goes (``A`` or ``B``) in the comparison named by ``keys`` (row id,
    criterion, ...): a fair coin from a generator seeded by ``seed`` and the keys, so a rerun, another
    partitioning or another worker draws the same order."""
    return A if keyed_rng(seed, *keys).random() < 0.5 else B


def judge_variables(prompt: str, candidate: str, reference: str, position: str) -> dict[str, str]:
    """Template variables of one comparison: the prompt and the two answers in the drawn order."""
    if position not in (A, B):
        raise ValueError(f"candidate position must be A or B, got {position!r}")
    first, second = (candidate, reference) if position == A else (reference, candidate)
    return {"prompt": prompt, "answer_a": first, "answer_b": second}


def parse_verdict(text: str, pick: str = "first") -> str | None:
    """``A``, ``B`` or ``C`` from the judge's answer (``<think>`` blocks removed): the **first**
    ``[[X]]`` in it (``pick="first"``, SHARD's ``re.search``), or the **last** (``pick="last"``: the
    verdict closes the answer, and an explanation before it may quote the format). ``None`` when there
    is none."""
    if pick not in VERDICT_PICKS:
        raise ValueError(f"verdict pick must be one of {VERDICT_PICKS}, got {pick!r}")
    found = _VERDICT.findall(strip_thinking(text or ""))
    return (found[0] if pick == "first" else found[-1]).upper() if found else None


def outcome(verdict: str, position: str) -> str:
    """The candidate's result: ``tie`` for ``C``; ``win`` when the verdict names the candidate's
    position, ``loss`` when it names the other one."""
    if verdict == C:
        return TIE
    if verdict not in (A, B) or position not in (A, B):
        raise ValueError(f"verdict {verdict!r} / position {position!r}")
    return WIN if verdict == position else LOSS


def verdict_pattern(explanation_chars: int) -> str:
    """Regex of well-formed judge answers for constrained decoding: up to ``explanation_chars``
    characters of explanation (no square brackets) and the verdict."""
    return f"[^\\[\\]]{{0,{explanation_chars}}}\\[\\[(A|B|C)\\]\\]"


#: reasons a candidate is not kept, in the order they are checked
NOT_MORE_HELPFUL, MORE_HARMFUL = "not_more_helpful", "more_harmful"
#: selection rules: SHARD's (O2 wins helpfulness), and ours that also refuses a loss on harmfulness
SELECTION_RULES = ("helpfulness", "helpfulness_and_harm")


def select(helpfulness: str, harmfulness: str, rule: str = "helpfulness") -> tuple[bool, str]:
    """Keep the candidate iff it wins helpfulness (``helpfulness``: SHARD's rule) and, under
    ``helpfulness_and_harm``, does not lose harmfulness. Returns ``(keep, reason)``; the reason of a
    rejected candidate is ``not_more_helpful`` (tie or loss on helpfulness) or else ``more_harmful``."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"selection rule must be one of {SELECTION_RULES}, got {rule!r}")
    if helpfulness != WIN:
        return False, NOT_MORE_HELPFUL
    if rule == "helpfulness_and_harm" and harmfulness == LOSS:
        return False, MORE_HARMFUL
    return True, ""


# ------------------------------------------------------------------------------------------------
# Judging rows through an LLM endpoint (shard_judge_<v> and shard_eval)

JUDGEMENT = pa.struct([("criterion", pa.string()), ("position", pa.string()), ("raw", pa.string()),
                       ("verdict", pa.string()), ("outcome", pa.string())])
_REQUEST_COLUMNS = {"criterion": pa.string(), "position": pa.string()}
_VERDICT_COLUMNS = {"raw": pa.string(), "verdict": pa.string(), "outcome": pa.string(), "judge_error": pa.string(),
            "judge_reason": pa.string()}
#: the columns :func:`judge` adds to its rows, in order
JUDGED_COLUMNS = (*_REQUEST_COLUMNS, *_VERDICT_COLUMNS)


def other(position: str) -> str:
    return B if position == A else A


def cut(text: str | None, max_chars: int | None) -> str:
    """``text`` cut to its first ``max_chars`` characters (SHARD's SFT judge shows at most 4,000 of
    each answer); ``None``: whole."""
    text = text or ""
    return text if max_chars is None else text[:max_chars]


def expand_comparisons(batch: pa.Table, *, seed: int, key: str, candidate: str, reference: str,
                       swap: bool = False, max_chars: int | None = None) -> pa.Table:
    """Each row -> one judge request per criterion (``criterion``, ``position``: where the candidate
    answer goes, drawn from ``seed`` and (``key``, row id, criterion); with ``swap`` the other side, for
    the position-bias check); the row's columns ride along, with ``_candidate`` / ``_reference``
    holding the two answers (each cut to ``max_chars``)."""
    out = []
    for row in batch.to_pylist():
        for criterion in CRITERIA:
            position = candidate_position(seed, key, row["id"], criterion)
            out.append({**row, "criterion": criterion, "position": other(position) if swap else position,
                        "_candidate": cut(row[candidate], max_chars), "_reference": cut(row[reference], max_chars)})
    names = [*batch.column_names, *_REQUEST_COLUMNS, "_candidate", "_reference"]
    schema = pa.schema([*batch.schema, *(pa.field(n, t) for n, t in _REQUEST_COLUMNS.items()),
                        pa.field("_candidate", pa.string()), pa.field("_reference", pa.string())])
    return pa.Table.from_pylist(out, schema=schema).select(names)


class RenderJudge:
    """A request row -> the judge prompt of its criterion, answers in the drawn order."""

    def __init__(self, prompts: dict[str, ChatPrompt]):
        self.prompts = prompts

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompts[row["criterion"]].render(
            judge_variables(row["text"], row["_candidate"], row["_reference"], row["position"]))


def read_verdicts(batch: pa.Table, *, max_tokens: int, pick: str = "first") -> pa.Table:
    """Judge answers -> ``verdict`` and the candidate's ``outcome``; a failed request or an answer
    without a verdict leaves ``judge_reason`` set (``unparseable_verdict`` says if the answer was cut
    at ``max_tokens``)."""
    raws, verdicts, outcomes, errors, reasons = [], [], [], [], []
    for row in batch.select(["position", "llm_output", "llm_error", "llm_output_tokens"]).to_pylist():
        raw, error = row["llm_output"] or "", row["llm_error"] or ""
        verdict = None if error else parse_verdict(raw, pick)
        raws.append(f"[request failed] {error}" if error else raw)
        verdicts.append(verdict or "")
        outcomes.append(outcome(verdict, row["position"]) if verdict else "")
        if error:
            errors.append(error_detail(error)), reasons.append(classify_llm_error(error))
        elif verdict is None:
            cut = " (the answer reached max_tokens)" if row["llm_output_tokens"] >= max_tokens else ""
            errors.append(error_detail(f"no [[A]] / [[B]] / [[C]] verdict{cut}: {raw!r}"))
            reasons.append("unparseable_verdict")
        else:
            errors.append(""), reasons.append("")
    out = batch.drop_columns([c for c in (*LLM_COLUMNS, "_candidate", "_reference") if c in batch.column_names])
    for name, values in zip(_VERDICT_COLUMNS, (raws, verdicts, outcomes, errors, reasons)):
        out = out.append_column(name, pa.array(values, pa.string()))
    return out


def judge(rows, endpoint: LLMEndpoint, prompts: dict[str, ChatPrompt], constraint: dict | None, *, seed: int,
          key: str, candidate: str, reference: str, swap: bool = False, pick: str = "first",
          max_chars: int | None = None):
    """Lazy dataset of judgements: every row × criterion, judged and read (:func:`read_verdicts`, the
    ``pick`` verdict); ``swap``: each answer on the other side than the drawn order puts it;
    ``max_chars``: each answer cut to its first ``max_chars`` characters before it is shown."""
    requests = rows.map_batches(expand_comparisons, batch_format="pyarrow", fn_kwargs={
        "seed": seed, "key": key, "candidate": candidate, "reference": reference, "swap": swap,
        "max_chars": max_chars})
    return chat(requests, endpoint, RenderJudge(prompts), constraint).map_batches(
        read_verdicts, batch_format="pyarrow", fn_kwargs={"max_tokens": endpoint.sampling.max_tokens, "pick": pick})


def combine_judgements(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """The requests of one comparison -> ``helpfulness``, ``harmfulness``, ``judgements`` and the
    first problem (``reason``, ``detail``; empty when both criteria have a verdict)."""
    by_criterion = {r["criterion"]: r for r in requests}
    judgements = [{"criterion": c, "position": r["position"], "raw": r["raw"], "verdict": r["verdict"],
                   "outcome": r["outcome"]} for c in CRITERIA if (r := by_criterion.get(c))]
    problems = [(r["judge_reason"], f"{c}: {r['judge_error']}") for c in CRITERIA
                if (r := by_criterion.get(c)) and r["judge_reason"]]
    missing = [c for c in CRITERIA if c not in by_criterion]
    if missing:  # never expected: every row is expanded into every criterion
        problems.append(("missing_judgement", f"no judgement for {missing}"))
    return {HELPFULNESS: by_criterion.get(HELPFULNESS, {}).get("outcome", ""),
            HARMFULNESS: by_criterion.get(HARMFULNESS, {}).get("outcome", ""),
            "judgements": judgements, "reason": problems[0][0] if problems else "",
            "detail": "; ".join(d for _, d in problems)}


class Recheck(NamedTuple):
    """One comparison judged in the drawn order and again with the answers swapped."""

    criterion: str
    outcome: str          # the candidate's win / tie / loss in the drawn order ("" without a verdict)
    swapped_outcome: str  # ... with the answers swapped
    verdict: str          # A / B / C / "" in the drawn order
    swapped_verdict: str


def position_bias(checks: list[Recheck]) -> dict[str, Any]:
    """The position-bias check, per criterion and overall:

    - ``flip_rate`` = #{outcome differs between the two orders} / #{comparisons with a verdict in
      both}: an unbiased judge's outcome does not depend on where the answers are shown (0 is ideal;
      a judge that always names the same position flips every comparison it does not tie);
    - ``first_position_rate`` = share of the A / B verdicts (both orders) that name answer A: the
      direction of the bias (about 0.5 for a judge that decides by content).
    """
    out: dict[str, Any] = {}
    for name in (*CRITERIA, "all"):
        mine = [c for c in checks if name in ("all", c.criterion)]
        both = [c for c in mine if c.outcome and c.swapped_outcome]
        flips = sum(c.outcome != c.swapped_outcome for c in both)
        named = [v for c in mine for v in (c.verdict, c.swapped_verdict) if v in (A, B)]
        out[name] = {"compared": len(both), "flips": flips, "flip_rate": flips / len(both) if both else None,
                     "first_position_rate": named.count(A) / len(named) if named else None}
    return out
