"""The keyword pool: seed keywords from the taxonomy, expanded by an LLM to a target per category.

Each micro category starts from its 20 bilingual seeds. An expansion round sends
``requests_per_category`` LLM requests per category still below ``target_per_category``, asking for
the missing count as ``中文 | English`` lines and listing the expansions it already has; the answers
are parsed, normalised and pooled. Rounds repeat until every category reaches the target or
``max_rounds`` rounds ran. Per category, seeds come first, then expansions in round and answer
order; a candidate that is too long or empty is dropped (``invalid_keyword``), one already in the
pool is dropped (``duplicate_keyword``), and candidates beyond the target are dropped
(``over_target``). A failed or unparseable request is one ``error`` row. Every candidate is
accounted for: in = ok + dropped + errored. Each round's answers are a scratch pass that a crashed
run reuses, so a rerun asks only the rounds that did not finish.

Output rows: ``text`` (the Chinese keyword, or the English one when the model gave only that),
``keyword_en``, ``lang``, ``macro``, ``micro``, ``method`` (``seed`` / ``expanded``), ``model``,
``round`` (0 for seeds).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from pydantic import Field

from actors.llm import chat
from pipelines.core.config import CONFIGS, ExistingPath, LLMEndpoint, Strict
from pipelines.core.parsing import classify_llm_error, clean_piece, strip_thinking
from pipelines.core.prompts import ChatPrompt, RenderRow
from pipelines.core.registry import register
from pipelines.core.rows import COMMON_COLUMNS, DROPPED, ERROR, OK, content_id, error_detail, make_row, to_table
from pipelines.core.stage import Stage, run_pass
from pipelines.core.taxonomy import Taxonomy, load_taxonomy
from pipelines.core.textnorm import has_cjk, normalize_text


class KeywordsConfig(Strict):
    """The keyword pool: the taxonomy's seed keywords, expanded by an LLM to a target per category."""

    model: str | None = Field(None, description="endpoint under `models:`; unset = seeds only")
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "expand_keywords.yaml"),
                                   validate_default=True)
    target_per_category: int = Field(80, ge=1, description="keywords kept per micro category")
    requests_per_category: int = Field(
        1, ge=1, description="LLM requests per category and round; answers are pooled and deduplicated")
    max_rounds: int = Field(
        3, ge=1, le=20, description="expansion rounds; each later round asks only the categories still "
        "below the target, for the missing count; categories short after the last are in the summary")
    max_chars: int = Field(32, ge=2, description="longer candidates are dropped (invalid_keyword)")

log = logging.getLogger(__name__)

LINEAGE = {"keyword_en": pa.string(), "model": pa.string(), "round": pa.int32()}
#: what a round's scratch pass keeps of the LLM answers
ANSWER_COLUMNS = ["id", "micro", "macro", "round", "request", "llm_output", "llm_error"]
#: ``ask(round, requests) -> answers``: one answer row per request with ``llm_output``/``llm_error``
Ask = Callable[[int, list[dict[str, Any]]], list[dict[str, Any]]]
_ITEM_SEPARATORS = re.compile(r"[;；\n]+")
_PAIR = re.compile(r"^(?P<a>.+?)\s*[|｜/]\s*(?P<b>.+)$")
_PAREN = re.compile(r"^(?P<a>.+?)\s*[(（](?P<b>[^()（）]+)[)）]$")


def normalize_keyword(text: str) -> str:
    """NFKC (full-width letters and digits fold), whitespace collapsed, quotes and numbering removed,
    trailing punctuation stripped; English lower-cased."""
    text = clean_piece(normalize_text(text, "nfkc")).strip(" .,，。、:：!！?？")
    return text if has_cjk(text) else text.lower()


def parse_keyword_answer(answer: str) -> list[tuple[str, str]]:
    """An LLM answer -> ``[(zh, en)]``. Items are separated by newlines or semicolons; an item is
    ``中文 | English``, ``中文 / English``, ``中文（English）`` or a single keyword in either language
    (the missing side is ``""``)."""
    pairs = []
    for item in _ITEM_SEPARATORS.split(strip_thinking(answer)):
        item = clean_piece(item)
        if not item or item.endswith((":", "：")):  # empty, or a preamble line
            continue
        match = _PAIR.match(item) or _PAREN.match(item)
        a, b = (match.group("a"), match.group("b")) if match else (item, "")
        a, b = normalize_keyword(a), normalize_keyword(b)
        if b and has_cjk(b) and not has_cjk(a):  # "English | 中文"
            a, b = b, a
        if not has_cjk(a) and not b:  # English only
            a, b = "", a
        if a or b:
            pairs.append((a, b))
    return pairs


def select_keywords(candidates: list[dict[str, Any]], target: int, max_chars: int) -> list[dict[str, Any]]:
    """Decide each candidate row of ONE category (seeds first, then expansions, in order): ``ok`` up
    to ``target`` distinct keywords, else dropped with a reason (``invalid_keyword``: empty, too
    long, or with U+FFFD from a broken decoding). Duplicates compare the Chinese
    side (or the English side when there is none), case-insensitively."""
    seen: set[str] = set()
    kept = 0
    for row in candidates:
        key = (row["text"] or row["keyword_en"]).casefold()
        if (not key or len(row["text"]) > max_chars or len(row["keyword_en"]) > 2 * max_chars
                or "\ufffd" in key):
            row.update(status=DROPPED, reason="invalid_keyword",
                       detail=f"empty, longer than {max_chars} characters, or broken characters")
        elif key in seen:
            row.update(status=DROPPED, reason="duplicate_keyword", detail=f"already in the pool: {key}")
        elif kept >= target:
            row.update(status=DROPPED, reason="over_target", detail=f"category already has {target}")
        else:  # explicit, so deciding a pool again after a round gives the same verdicts
            row.update(status=OK, reason="", detail="")
            seen.add(key)
            kept += 1
    return candidates


def _keyword_row(zh: str, en: str, micro: str, macro: str, method: str, model: str,
                 parent_id: str, round_no: int) -> dict[str, Any]:
    text = zh or en
    return make_row(id=content_id(text.casefold(), micro), text=text, keyword_en=en,
                    lang="zh" if zh else "en", macro=macro, micro=micro, source="keyword",
                    method=method, model=model, parent_id=parent_id, round=round_no)


def seed_rows(taxonomy: Taxonomy) -> dict[str, list[dict[str, Any]]]:
    return {code: [_keyword_row(kw.zh, kw.en, code, taxonomy.macro_of(code), "seed", "", "", 0)
                   for kw in taxonomy.seed_keywords(code)]
            for code in taxonomy.micro_codes}


def _shown(row: dict[str, Any]) -> str:
    """A kept keyword as the prompt lists it: ``中文 | English`` (or the one side it has)."""
    return " | ".join(side for side in (row["text"] if row["lang"] == "zh" else "", row["keyword_en"]) if side)


def expansion_requests(taxonomy: Taxonomy, config: KeywordsConfig, pools: dict[str, list[dict[str, Any]]],
                       round_no: int) -> list[dict[str, Any]]:
    """Round ``round_no``'s request rows (with the template's variables): for each micro category
    whose pool, as decided by :func:`select_keywords`, keeps fewer than ``target_per_category``,
    ``requests_per_category`` requests for the missing count. ``existing`` lists the expansions it
    already kept (one per line), so the model is told not to repeat them; ``seeds`` the seeds."""
    requests = []
    for code in taxonomy.micro_codes:
        kept = [row for row in pools[code] if row["status"] == OK]
        missing = config.target_per_category - len(kept)
        if missing <= 0:
            continue
        micro, macro = taxonomy.micro(code), taxonomy.macro(code)
        existing = "\n".join(_shown(row) for row in kept if row["method"] != "seed")
        for r in range(config.requests_per_category):
            requests.append({
                "id": content_id(code, "expand", str(round_no), str(r)), "micro": code,
                "macro": macro.code, "macro_zh": macro.zh, "macro_en": macro.en, "micro_zh": micro.zh,
                "micro_en": micro.en, "seeds": [str(kw) for kw in micro.keywords], "existing": existing,
                "count": missing, "round": round_no, "request": r,
            })
    return requests


def answers_to_candidates(answers: list[dict[str, Any]], model: str) -> tuple[dict[str, list], list]:
    """LLM answers -> candidate rows per micro category, and error rows for failed requests."""
    by_micro: dict[str, list[dict[str, Any]]] = {}
    errors = []
    for row in sorted(answers, key=lambda r: (r["micro"], r["round"], r["request"])):
        common = dict(macro=row["macro"], micro=row["micro"], source="keyword", method="expanded",
                      model=model, parent_id=row["id"], round=row["round"])
        if row["llm_error"]:
            errors.append(make_row(id=row["id"], status=ERROR, reason=classify_llm_error(row["llm_error"]),
                                   detail=error_detail(row["llm_error"]), **common))
            continue
        pairs = parse_keyword_answer(row["llm_output"])
        if not pairs:
            errors.append(make_row(id=row["id"], status=ERROR, reason="unparseable_output",
                                   detail=error_detail(f"no keyword in: {row['llm_output']!r}"), **common))
            continue
        by_micro.setdefault(row["micro"], []).extend(
            _keyword_row(zh, en, row["micro"], row["macro"], "expanded", model, row["id"], row["round"])
            for zh, en in pairs)
    return by_micro, errors


def expand_pool(taxonomy: Taxonomy, config: KeywordsConfig, ask: Ask | None,
                model: str) -> list[dict[str, Any]]:
    """The decided keyword rows (seeds, then each round's candidates, per category in taxonomy
    order) followed by the error rows of failed requests.

    Round ``k`` (1 .. ``max_rounds``) asks ``ask(k, requests)`` for the categories still short (see
    :func:`expansion_requests`) and stops early once none is; ``ask=None`` keeps the seeds only.
    Every request must come back as exactly one answer, which ends as candidate rows (ok/dropped)
    or one error row."""
    pools = seed_rows(taxonomy)

    def decide() -> None:
        for code in taxonomy.micro_codes:
            select_keywords(pools[code], config.target_per_category, config.max_chars)

    decide()
    errors: list[dict[str, Any]] = []
    for round_no in range(1, config.max_rounds + 1 if ask is not None else 1):
        requests = expansion_requests(taxonomy, config, pools, round_no)
        if not requests:
            break
        log.info("keywords: round %d, %d requests for %d categories below %d", round_no, len(requests),
                 len({r["micro"] for r in requests}), config.target_per_category)
        answers = ask(round_no, requests)
        asked, answered = Counter(r["id"] for r in requests), Counter(a["id"] for a in answers)
        if asked != answered:
            raise RuntimeError(f"keywords round {round_no}: {len(requests)} requests but answers for "
                               f"{sum(answered.values())}; differing ids: "
                               f"{sorted(set(asked) ^ set(answered))[:5]}")
        expanded, failed = answers_to_candidates(answers, model)
        errors.extend(failed)
        for code, rows in expanded.items():
            pools[code].extend(rows)
        decide()
    return [row for code in taxonomy.micro_codes for row in pools[code]] + errors


class KeywordPoolStage(Stage):
    name = "keywords"
    # keywords carry their category, no label
    writes = (COMMON_COLUMNS - {"label"}) | frozenset(LINEAGE)

    def __init__(self, config: KeywordsConfig, endpoint: LLMEndpoint | None, taxonomy_path: str):
        super().__init__(config)
        self.endpoint = endpoint
        self.taxonomy = load_taxonomy(taxonomy_path)
        self.prompt = ChatPrompt(config.template) if endpoint is not None else None

    def hash_payload(self) -> dict[str, Any]:
        # the pool starts from the taxonomy's seed keywords, which its digest leaves out; the expansion
        # prompt names the categories, the seeds-only pool shows no names (a renamed category changes nothing)
        payload = super().hash_payload()
        payload["seeds"] = {code: [str(k) for k in self.taxonomy.seed_keywords(code)]
                            for code in self.taxonomy.micro_codes}
        if self.prompt is None:
            del payload["taxonomy"]
        return payload

    def ask(self, rundir) -> Ask:
        """Each round's requests through the endpoint, as a scratch pass a crashed run reuses."""
        import ray

        def answer(round_no: int, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
            answered = run_pass(self, rundir, f"round-{round_no}", lambda: chat(
                ray.data.from_items(requests), self.endpoint, RenderRow(self.prompt)
            ).select_columns(ANSWER_COLUMNS))
            return answered.take_all() if answered is not None else []

        return answer

    def write(self, inputs: dict, rundir) -> None:
        import ray

        ask = self.ask(rundir) if self.endpoint is not None else None
        rows = expand_pool(self.taxonomy, self.config, ask, self.endpoint.model if self.endpoint else "")
        ray.data.from_arrow(to_table(rows, LINEAGE)).write_parquet(rundir.uri(self.name),
                                                                   partition_cols=["status"])

    def summary(self, rundir) -> dict[str, Any]:
        """Kept keywords per category, the rounds that ran (and requests in each), and the
        categories still below the target (with their counts) after the last round."""
        counts = Counter(rundir.column_values(self.name, OK, "micro"))
        requests: dict[int, set[str]] = {}
        for status in (OK, DROPPED, ERROR):
            for round_no, parent in zip(rundir.column_values(self.name, status, "round"),
                                        rundir.column_values(self.name, status, "parent_id")):
                if round_no:
                    requests.setdefault(round_no, set()).add(parent)
        target = self.config.target_per_category
        short = {code: counts.get(code, 0) for code in self.taxonomy.micro_codes
                 if counts.get(code, 0) < target}
        if short:
            log.warning("keywords: %d categories below the target of %d after %d rounds: %s",
                        len(short), target, len(requests), short)
        return {"per_category": dict(sorted(counts.items())), "target": target,
                "rounds": len(requests), "max_rounds": self.config.max_rounds,
                "requests_per_round": {str(k): len(v) for k, v in sorted(requests.items())},
                "below_target": short}


register("keywords", config=KeywordsConfig,
         build=lambda recipe, config: [KeywordPoolStage(
             config, recipe.models[config.model] if config.model else None, recipe.taxonomy)],
         check=lambda config, refs: {"stages.keywords.model": config.model})
