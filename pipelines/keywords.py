"""The keyword pool: seed keywords from the taxonomy, expanded by an LLM to a target per category.

Each micro category starts from its 20 bilingual seeds. ``requests_per_category`` LLM requests ask
for the missing count as ``中文 | English`` lines; the answers are parsed, normalised and pooled. Per
category, seeds come first, then expansions in answer order; a candidate that is too long or empty is
dropped (``invalid_keyword``), one already in the pool is dropped (``duplicate_keyword``), and
candidates beyond the target are dropped (``over_target``). A failed or unparseable request is one
``error`` row. Every candidate is accounted for: in = ok + dropped + errored.

Output rows: ``text`` (the Chinese keyword, or the English one when the model gave only that),
``keyword_en``, ``lang``, ``macro``, ``micro``, ``method`` (``seed`` / ``expanded``), ``model``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any

import pyarrow as pa

from actors.llm import chat
from pipelines.config import KeywordsConfig, LLMEndpoint
from pipelines.parsing import clean_piece, strip_thinking
from pipelines.prompts import ChatPrompt
from pipelines.rewrite import RenderRow, classify_llm_error
from pipelines.rows import DROPPED, ERROR, OK, content_id, error_detail, make_row, to_table
from pipelines.stage import Stage
from pipelines.taxonomy import Taxonomy, load_taxonomy
from pipelines.textnorm import has_cjk, normalize_text

log = logging.getLogger(__name__)

LINEAGE = {"keyword_en": pa.string(), "model": pa.string()}
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
        else:
            seen.add(key)
            kept += 1
    return candidates


def _keyword_row(zh: str, en: str, micro: str, macro: str, method: str, model: str,
                 parent_id: str) -> dict[str, Any]:
    text = zh or en
    return make_row(id=content_id(text.casefold(), micro), text=text, keyword_en=en,
                    lang="zh" if zh else "en", macro=macro, micro=micro, source="keyword",
                    method=method, model=model, parent_id=parent_id)


def seed_rows(taxonomy: Taxonomy) -> dict[str, list[dict[str, Any]]]:
    return {code: [_keyword_row(kw.zh, kw.en, code, taxonomy.macro_of(code), "seed", "", "")
                   for kw in taxonomy.seed_keywords(code)]
            for code in taxonomy.micro_codes}


def expansion_requests(taxonomy: Taxonomy, config: KeywordsConfig) -> list[dict[str, Any]]:
    """One request row per (micro category, request index) with the template's variables."""
    requests = []
    for code in taxonomy.micro_codes:
        micro, macro = taxonomy.micro(code), taxonomy.macro(code)
        missing = config.target_per_category - len(micro.keywords)
        for r in range(config.requests_per_category):
            requests.append({
                "id": content_id(code, "expand", str(r)), "micro": code, "macro": macro.code,
                "macro_zh": macro.zh, "macro_en": macro.en, "micro_zh": micro.zh, "micro_en": micro.en,
                "seeds": [str(kw) for kw in micro.keywords], "count": missing, "request": r,
            })
    return requests


def answers_to_candidates(answers: list[dict[str, Any]], model: str) -> tuple[dict[str, list], list]:
    """LLM answers -> candidate rows per micro category, and error rows for failed requests."""
    by_micro: dict[str, list[dict[str, Any]]] = {}
    errors = []
    for row in sorted(answers, key=lambda r: (r["micro"], r["request"])):
        common = dict(macro=row["macro"], micro=row["micro"], source="keyword", method="expanded",
                      model=model, parent_id=row["id"])
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
            _keyword_row(zh, en, row["micro"], row["macro"], "expanded", model, row["id"])
            for zh, en in pairs)
    return by_micro, errors


class KeywordPoolStage(Stage):
    name = "keywords"

    def __init__(self, config: KeywordsConfig, endpoint: LLMEndpoint | None, taxonomy_path: str):
        super().__init__(config)
        self.endpoint = endpoint
        self.taxonomy_path = taxonomy_path
        self.prompt = ChatPrompt(config.template) if endpoint is not None else None

    @property
    def taxonomy(self) -> Taxonomy:
        return load_taxonomy(self.taxonomy_path)

    def hash_payload(self) -> Any:
        return {"config": self.config.model_dump(mode="json"),
                "endpoint": self.endpoint.model_dump(mode="json") if self.endpoint else None,
                "template_digest": self.prompt.digest if self.prompt else None,
                "seeds": {code: [str(k) for k in self.taxonomy.seed_keywords(code)]
                          for code in self.taxonomy.micro_codes}}

    def build(self, inputs: dict) -> Any:
        import ray

        taxonomy = self.taxonomy
        pools = seed_rows(taxonomy)
        errors: list[dict[str, Any]] = []
        requests = expansion_requests(taxonomy, self.config)
        if self.endpoint is not None and requests and requests[0]["count"] > 0:
            log.info("keywords: %d expansion requests to %s", len(requests), self.endpoint.model)
            answers = chat(ray.data.from_items(requests), self.endpoint, RenderRow(self.prompt)).take_all()
            expanded, errors = answers_to_candidates(answers, self.endpoint.model)
            for code, rows in expanded.items():
                pools[code].extend(rows)
        rows = [row for code in taxonomy.micro_codes
                for row in select_keywords(pools[code], self.config.target_per_category,
                                           self.config.max_chars)]
        return ray.data.from_arrow(to_table(rows + errors, LINEAGE))

    def summary(self, rundir) -> dict[str, Any]:
        counts = Counter(rundir.column_values(self.name, OK, "micro"))
        target = self.config.target_per_category
        short = {code: counts.get(code, 0) for code in self.taxonomy.micro_codes
                 if counts.get(code, 0) < target}
        if short:
            log.warning("keywords: %d categories below the target of %d: %s", len(short), target, short)
        return {"per_category": dict(sorted(counts.items())), "target": target,
                "below_target": short}
