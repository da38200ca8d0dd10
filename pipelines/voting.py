"""Label calibration math: verdict parsing, the jury's decision rule, adjudicator answers, agreement.

Pure functions, unit-tested with hand-computed cases; the jury stages (``pipelines/jury.py``) call
them on Arrow batches.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from pipelines.parsing import strip_thinking

SAFE, UNSAFE = "safe", "unsafe"
LABELS = (SAFE, UNSAFE)
MAJORITY, ADJUDICATED = "majority", "adjudicated"

#: the verdict words a constrained judge may answer with (both languages)
VERDICT_CHOICES = ("不安全", "安全", UNSAFE, SAFE)

# Longest words first: "unsafe" contains "safe", "不安全" contains "安全".
_UNSAFE_WORDS = ("不安全", "有害", "违规", "不合规", "unsafe", "harmful", "not safe")
_SAFE_WORDS = ("安全", "无害", "合规", "safe", "harmless", "benign")
_PREFIXES = re.compile(r"^\s*(?:判断|结论|答案|标签|verdict|answer|label|final answer)\s*[:：]\s*",
                       re.IGNORECASE)
_CODE = re.compile(r"(?<![A-Za-z0-9])([A-Ea-e])\s*([1-9])(?![0-9])")


def parse_verdict(text: str) -> str | None:
    """A judge's answer -> ``safe`` / ``unsafe``, or ``None`` (an abstention).

    Only the first line of the answer (after any ``<think>`` block, a "判断：" / "Verdict:" prefix,
    quotes and Markdown emphasis) is read. It must start with a verdict word in Chinese or English
    ("不安全", "unsafe", "有害", "安全", "safe", ...); an answer that names both labels first-word
    ambiguously, refuses, or says something else is an abstention.
    """
    answer = strip_thinking(text or "")
    lines = [ln for ln in answer.splitlines() if ln.strip()]
    if not lines:
        return None
    head = _PREFIXES.sub("", lines[0]).strip().strip("*_`\"'“”「」【】[]()（）").strip().lower()
    for word in _UNSAFE_WORDS:
        if head.startswith(word):
            return UNSAFE
    for word in _SAFE_WORDS:
        if head.startswith(word):
            return SAFE
    return None


@dataclass(frozen=True)
class Decision:
    """The jury's outcome for one row: ``label`` is ``None`` when the adjudicator must decide."""

    label: str | None
    valid_votes: int
    tie: bool


def decide(verdicts: Sequence[str | None]) -> Decision:
    """Strict majority of the valid votes.

    With ``v`` valid votes of which ``u`` say unsafe: ``unsafe`` if ``u > v/2``, ``safe`` if
    ``v - u > v/2``, otherwise (a tie, or ``v = 0``) no label: the row goes to the adjudicator.
    Abstentions (``None``) do not count: 2-1 with one abstention is a majority, 2-2 a tie.
    """
    valid = [v for v in verdicts if v in LABELS]
    unsafe = sum(v == UNSAFE for v in valid)
    safe = len(valid) - unsafe
    if 2 * unsafe > len(valid):
        return Decision(UNSAFE, len(valid), False)
    if 2 * safe > len(valid):
        return Decision(SAFE, len(valid), False)
    return Decision(None, len(valid), bool(valid))


def parse_code(text: str, codes: Iterable[str]) -> str | None:
    """The first micro-category code (``A1`` ... ``E2``) in ``text`` that is one of ``codes``."""
    allowed = set(codes)
    for letter, digit in _CODE.findall(strip_thinking(text or "")):
        code = letter.upper() + digit
        if code in allowed:
            return code
    return None


@dataclass(frozen=True)
class Adjudication:
    label: str | None
    micro: str | None
    problem: str  # "" when usable, else a reason code


def parse_adjudication(text: str, *, need_label: bool, codes: Iterable[str]) -> Adjudication:
    """An adjudicator answer -> (label, micro code, problem).

    ``need_label``: the jury had no majority, so the answer must start with a verdict (as for a
    judge), followed by a code when it is unsafe. Otherwise the row is already unsafe and only the
    code is read. Problems: ``adjudicator_unparseable`` (no verdict), ``adjudicator_invalid_code``
    (unsafe without one of ``codes``).
    """
    codes = tuple(codes)
    label = parse_verdict(text) if need_label else UNSAFE
    if label is None:
        # "unsafe A3" style answers put the verdict and code on one line; parse_verdict reads it.
        return Adjudication(None, None, "adjudicator_unparseable")
    if label == SAFE:
        return Adjudication(SAFE, None, "")
    code = parse_code(text, codes)
    if code is None:
        return Adjudication(UNSAFE, None, "adjudicator_invalid_code")
    return Adjudication(UNSAFE, code, "")


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa for ``N`` items each rated by the same number ``n`` of raters into ``k``
    categories; ``counts[i][j]`` = raters who put item ``i`` in category ``j``.

        P_i  = (sum_j n_ij^2 - n) / (n (n - 1))          agreement on item i
        P̄    = mean_i P_i
        p_j  = sum_i n_ij / (N n)                         share of category j
        P̄_e  = sum_j p_j^2
        κ    = (P̄ - P̄_e) / (1 - P̄_e)

    Returns ``None`` when undefined (no items, fewer than 2 raters, or ``P̄_e = 1``: every rating in
    one category). Items must all have the same ``n``.
    """
    rows = [list(r) for r in counts if sum(r) > 0]
    if not rows:
        return None
    n = sum(rows[0])
    if any(sum(r) != n for r in rows):
        raise ValueError("fleiss_kappa: every item needs the same number of ratings")
    if n < 2:
        return None
    big_n, k = len(rows), len(rows[0])
    p_items = [(sum(c * c for c in r) - n) / (n * (n - 1)) for r in rows]
    p_bar = sum(p_items) / big_n
    p_j = [sum(r[j] for r in rows) / (big_n * n) for j in range(k)]
    p_e = sum(p * p for p in p_j)
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)


class AgreementReport:
    """Streaming accumulator for the agreement report of a labelled dataset.

    Feed it rows (``add``) with the final label, the votes of each judge, how the label was decided,
    and the source label; ``result()`` gives per-judge agreement with the final label, Fleiss' kappa
    over the rows where every judge gave a valid verdict, tie / abstention / adjudication rates and
    flips per source and per macro category.
    """

    def __init__(self, judges: Sequence[str]):
        self.judges = list(judges)
        self.rows = 0
        self.agree = Counter()      # judge -> votes equal to the final label
        self.valid = Counter()      # judge -> valid votes
        self.abstain = Counter()    # judge -> abstentions
        self.kappa_counts: list[tuple[int, int]] = []
        self.ties = self.no_votes = self.adjudicated = 0
        self.flips = {"source": Counter(), "macro": Counter()}
        self.totals = {"source": Counter(), "macro": Counter()}

    def add(self, *, label: str, votes: dict[str, str | None], decision: str, source: str,
            macro: str, source_label: str) -> None:
        self.rows += 1
        for judge in self.judges:
            verdict = votes.get(judge)
            if verdict in LABELS:
                self.valid[judge] += 1
                self.agree[judge] += verdict == label
            else:
                self.abstain[judge] += 1
        verdicts = [votes.get(j) for j in self.judges]
        if all(v in LABELS for v in verdicts):
            unsafe = sum(v == UNSAFE for v in verdicts)
            self.kappa_counts.append((len(verdicts) - unsafe, unsafe))
        outcome = decide(verdicts)
        self.ties += outcome.tie
        self.no_votes += outcome.valid_votes == 0
        self.adjudicated += decision == ADJUDICATED
        for key, value in (("source", source or "?"), ("macro", macro or "?")):
            self.totals[key][value] += 1
            if source_label in LABELS and source_label != label:
                self.flips[key][value] += 1

    def result(self) -> dict:
        rate = (lambda x, n: round(x / n, 4) if n else None)
        return {
            "rows": self.rows,
            "judges": {j: {"valid_votes": self.valid[j], "abstentions": self.abstain[j],
                           "abstention_rate": rate(self.abstain[j], self.rows),
                           "agreement_with_final": rate(self.agree[j], self.valid[j])}
                       for j in self.judges},
            "fleiss_kappa": fleiss_kappa(self.kappa_counts),
            "fleiss_kappa_rows": len(self.kappa_counts),
            "tie_rate": rate(self.ties, self.rows),
            "no_valid_vote_rate": rate(self.no_votes, self.rows),
            "adjudication_rate": rate(self.adjudicated, self.rows),
            "flips": {key: {v: {"rows": self.totals[key][v], "flipped": self.flips[key][v],
                                "rate": rate(self.flips[key][v], self.totals[key][v])}
                            for v in sorted(self.totals[key])}
                      for key in ("source", "macro")},
        }


def agreement_markdown(report: dict) -> str:
    """The agreement report as a Markdown page (written beside the JSON)."""
    lines = ["# Jury agreement", "", f"Rows labelled: {report['rows']}", "",
             "| judge | valid votes | abstentions | abstention rate | agreement with final label |",
             "|---|---|---|---|---|"]
    for judge, j in report["judges"].items():
        lines.append(f"| {judge} | {j['valid_votes']} | {j['abstentions']} | {j['abstention_rate']} | "
                     f"{j['agreement_with_final']} |")
    kappa = report["fleiss_kappa"]
    lines += ["", f"- Fleiss' kappa: {'undefined' if kappa is None else f'{kappa:.4f}'} "
                  f"(over {report['fleiss_kappa_rows']} rows where every judge gave a verdict)",
              f"- tie rate: {report['tie_rate']}; no valid vote: {report['no_valid_vote_rate']}; "
              f"adjudicated: {report['adjudication_rate']}", ""]
    for key in ("source", "macro"):
        lines += [f"## Flips of the source label per {key}", "", f"| {key} | rows | flipped | rate |",
                  "|---|---|---|---|"]
        for value, f in report["flips"][key].items():
            lines.append(f"| {value} | {f['rows']} | {f['flipped']} | {f['rate']} |")
        lines.append("")
    return "\n".join(lines)
