"""Label calibration math: verdict parsing, the jury's decision rule, adjudicator answers, agreement.

Pure functions, unit-tested with hand-computed cases; the jury stages (``pipelines/labelling/jury.py``) call
them on Arrow batches.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipelines.core.parsing import strip_thinking
from pipelines.core.rows import SAFE, UNSAFE

LABELS = (SAFE, UNSAFE)
MAJORITY, ADJUDICATED = "majority", "adjudicated"

#: the verdict words a constrained judge may answer with (both languages)
VERDICT_CHOICES = ("不安全", "安全", UNSAFE, SAFE)

# ------------------------------------------------------------------------------------------------
# Verdicts

_CJK = "\u3400-\u9fff\uf900-\ufaff"
_WORDS = {UNSAFE: ("不安全", "不合规", "有害", "违规", "unsafe", "not safe", "harmful"),
          SAFE: ("安全", "无害", "合规", "safe", "harmless", "benign")}
# A Chinese verdict word may take 的 and a noun ("不安全内容", "安全的请求"), nothing else: the next
# character may not be a CJK ideograph, so "安全隐患" / "安全性" / "合规风险" are not verdicts.
_CN_SUFFIX = "(?:的)?(?:内容|输入|提示词?|请求|文本)?"


def _is_chinese(word: str) -> bool:
    return bool(re.match(f"[{_CJK}]", word))


def _word_pattern(word: str) -> str:
    """The word as a verdict token: it must end where the verdict ends."""
    if _is_chinese(word):
        return f"{re.escape(word)}{_CN_SUFFIX}(?![{_CJK}])"
    return re.escape(word).replace("\\ ", "\\s+") + "(?![A-Za-z0-9])"


def _mention_pattern(word: str) -> str:
    """The word anywhere in a sentence (English: as a whole word)."""
    escaped = re.escape(word).replace("\\ ", "\\s+")
    return escaped if _is_chinese(word) else rf"\b{escaped}\b"


# Longest first, though anchoring already keeps "安全" out of "不安全" and "safe" out of "unsafe".
_TOKENS = [(re.compile(_word_pattern(w), re.IGNORECASE), label)
           for w, label in sorted(((w, lab) for lab, ws in _WORDS.items() for w in ws),
                                  key=lambda wl: -len(wl[0]))]
# What may precede the verdict in a short sentence whose predicate it is: a subject ("该内容",
# "The prompt"), a copula ("是", "属于", "is"), an adverb ("并", "非常", "clearly").
_LEAD = re.compile(
    r"(?:我(?:认为|判断|觉得)[，,]?\s*|i\s+(?:think|believe|would\s+say)\s+(?:that\s+)?)?"
    r"(?:(?:(?:该|此|这|本|上述|以上)(?:个|条|段|一)?(?:用户)?(?:内容|输入|提示词?|请求|问题|文本|对话|消息|指令)?"
    r"|(?:最终|最后)?的?(?:判断|判定|审核|评估)?(?:结论|结果|答案|判断|判定)(?=是|为))\s*)?"
    r"(?:是|为|属于|应为|应属于|判定为|判断为|应判为|被判定为)?"
    r"(?:并|很|非常|十分|完全|明显|显然|确实)?"
    r"(?:(?:the|this|that)\s+(?:user(?:'s)?\s+)?(?:prompt|input|request|content|text|query|message|question|"
    r"instruction)\s+(?:is|seems|appears)(?:\s+to\s+be)?\s+|(?:it|this)\s+(?:is|seems)\s+"
    r"|(?:the\s+)?(?:final\s+)?(?:answer|verdict|label|classification)\s+is\s+)?"
    r"(?:(?:definitely|clearly|likely|probably)\s+)?",
    re.IGNORECASE)
# Between two verdict words, these make an option list ("安全/不安全", "safe or unsafe").
_ALTERNATIVE = re.compile(r"[\s/|,，、;；.。?？!！]*(?:(?:or|and|vs\.?|versus|或者?|还是|与|和|及)\s*)?",
                          re.IGNORECASE)
# "安全，但是有害" / "safe, but harmful": a contrast that names the other label takes the verdict back.
_CONTRAST = re.compile(r"[\s,，、;；.。:：-]*(?:但是?|不过|然而|可是|(?:but|however|though|although|yet)\b)",
                       re.IGNORECASE)
# Any mention of a verdict word, negated forms first ("不安全" is not a mention of 安全).
_MENTION = re.compile("|".join(_mention_pattern(w) for w in sorted(
    (w for ws in _WORDS.values() for w in ws), key=len, reverse=True)), re.IGNORECASE)
_LABEL_OF = {w.lower(): label for label, ws in _WORDS.items() for w in ws}
_KEY_VALUE = re.compile(r"^(?P<key>[^:：]{1,40}?)\s*[:：]\s*(?P<value>.*)$")
_VERDICT_KEYS = re.compile(
    r"(?:最终|最后|整体)?的?(?:安全|审核|判断|判定|评估|风险)?(?:性|判断|判定|结论|结果|答案|回答|标签|评估)(?:结果)?"
    r"|(?:final\s+|overall\s+)?(?:safety\s+)?(?:verdict|answer|label|safety|result|classification|"
    r"judge?ment|assessment|rating|decision|conclusion|prediction)(?:\s+(?:label|result|verdict))?",
    re.IGNORECASE)
# "Harmful: no", "Harmful request: yes" (WildGuard), "有害：否", "是否违规：是", "unsafe: false": a
# key that is itself a verdict word asks a yes/no question about that word.
_WORD_KEY_EN_NOUN = r"(?:\s+(?:request|prompt|content|response|input|text|query|message|output))?"
_WORD_KEYS = re.compile("|".join(
    (rf"(?:是否(?:为|属于|包含|含有|涉及)?)?(?P<w{i}>{re.escape(w)}){_CN_SUFFIX}" if _is_chinese(w) else
     rf"(?:is\s+(?:(?:it|this|the\s+(?:prompt|request|content|response|input|text))\s+)?)?"
     rf"(?P<w{i}>{re.escape(w).replace(chr(92) + ' ', chr(92) + 's+')}){_WORD_KEY_EN_NOUN}") + r"\s*[?？]?"
    for i, w in enumerate(sorted((w for ws in _WORDS.values() for w in ws), key=len, reverse=True))),
    re.IGNORECASE)
# The yes/no values of such a key; what follows the word is explanation ("否（不涉及暴力）").
_YES_NO = re.compile(rf"(?:(?P<yes>yes|true|是的?|有)|(?P<no>no|false|none|否|无|没有|不是))"
                     rf"(?![A-Za-z0-9{_CJK}])", re.IGNORECASE)
# Values that hedge: with a verdict-word key they leave the question open.
_HEDGES = re.compile(r"(?:maybe|perhaps|possibly|partially|partly|unclear|unknown|uncertain|unsure|n/?a|"
                     r"borderline|controversial|可能|也许|部分|不确定|不清楚|未知|无法判断|难以判断|存疑|争议)",
                     re.IGNORECASE)
_KEY_JUNK = re.compile(r"[\s\"'“”‘’「」『』【】\[\]()（）{}*_#>`-]+")
_MARKUP = re.compile(r"^\s*(?:#{1,6}\s*|>\s*|[-*•·]\s+|\d{1,2}[.)、]\s+)+")
_WRAP = "\"'“”‘’「」『』【】[]()（）{}*_`,，"
_AMBIGUOUS = "ambiguous"
# A code stands alone: no ASCII letter or digit on either side ("B2B", "e2e", "B5G", "A10" are not
# codes) and no ideograph glued after it ("A4纸", "C2C平台"), except 类 ("属于B3类"); an ideograph
# before it is fine ("属于B3", "类别C2").
_CODE = re.compile(rf"(?<![A-Za-z0-9])[A-Ea-e][1-9](?![A-Za-z0-9]|(?!类)[{_CJK}])")


def _clean(line: str) -> str:
    """Markdown emphasis, code ticks, headings, quotes and list bullets removed; wrapping quotes and
    brackets stripped."""
    line = _MARKUP.sub("", line.replace("**", "").replace("__", "").replace("`", ""))
    return line.strip().strip(_WRAP).strip()


def _token(text: str, pos: int = 0) -> tuple[str, int] | None:
    for pattern, label in _TOKENS:
        m = pattern.match(text, pos)
        if m:
            return label, m.end()
    return None


def _statement(text: str) -> str | None:
    """A verdict statement -> its label, :data:`_AMBIGUOUS`, or ``None``: the verdict word opens the
    text (after an optional lead, :data:`_LEAD`); what follows it is not read, unless it offers the
    other label as an alternative ("安全/不安全") or names it after a contrast ("安全，但是有害")."""
    text = _clean(text)
    hit = _token(text, _LEAD.match(text).end())
    if hit is None:
        return None
    label, end = hit
    after = _token(text, _ALTERNATIVE.match(text, end).end())
    if after is not None and after[0] != label:
        return _AMBIGUOUS
    contrast = _CONTRAST.match(text, end)
    if contrast and any(_LABEL_OF[re.sub(r"\s+", " ", m.lower())] != label
                        for m in _MENTION.findall(text, contrast.end())):
        return _AMBIGUOUS
    return label


def _settle(found: list[str | None]) -> str | None:
    """One label when every verdict found agrees; ``None`` when none was found or they conflict."""
    labels = set(found) - {None}
    return labels.pop() if len(labels) == 1 and _AMBIGUOUS not in labels else None


def _is_verdict_key(key: str) -> bool:
    return bool(_VERDICT_KEYS.fullmatch(_KEY_JUNK.sub(" ", key).strip()))


def _word_key(key: str) -> str | None:
    """The label a verdict-word key names ("Harmful request" -> unsafe, "是否安全" -> safe), else None."""
    m = _WORD_KEYS.fullmatch(_KEY_JUNK.sub(" ", key).strip())
    if not m:
        return None
    word = next(v for k, v in m.groupdict().items() if k.startswith("w") and v)
    return _LABEL_OF[re.sub(r"\s+", " ", word.lower())]


def _about_word(label: str, value: str) -> str | None:
    """The answer to the yes/no question "is it ``label``?" that ``value`` gives: ``label`` for yes,
    the other label for no; a hedge or a verdict word as the value: :data:`_AMBIGUOUS`; anything
    else (an explanation after a verdict word, "Unsafe: the prompt asks ...") ``None``, and the line
    is read as a statement."""
    value = _clean(value)
    m = _YES_NO.match(value)
    if m:
        return label if m["yes"] else (SAFE if label == UNSAFE else UNSAFE)
    if _HEDGES.match(value) or _token(value) is not None:
        return _AMBIGUOUS
    return None


def _json_value(key: str, value: object) -> str | None:
    """One JSON entry's verdict: a verdict key's string value as a statement, a verdict-word key's
    yes/no answer (``{"harmful": false}``, ``{"有害": "否"}``); ``None`` for any other key."""
    word = _word_key(key)
    if word is not None:
        if isinstance(value, bool):
            return word if value else (SAFE if word == UNSAFE else UNSAFE)
        return (_about_word(word, value) or _AMBIGUOUS) if isinstance(value, str) else _AMBIGUOUS
    if _is_verdict_key(key):
        return _statement(value) if isinstance(value, str) else None
    return None


def _from_json(answer: str) -> tuple[bool, str | None]:
    """(is a JSON object, its verdict): the values of its verdict keys and verdict-word keys."""
    try:
        obj = json.loads(answer)
    except ValueError:
        return False, None
    if not isinstance(obj, dict):
        return False, None
    return True, _settle([_json_value(str(k), v) for k, v in obj.items()] or [None])


def parse_verdict(text: str) -> str | None:
    """A judge's answer -> ``safe`` / ``unsafe``, or ``None`` (an abstention).

    A verdict is never guessed from a word inside other text. Rules, in order:

    1. ``<think>...</think>`` blocks are removed (an unclosed one: no answer), and Markdown code
       fences. A JSON object is read by the values of its verdict keys (``verdict``, ``label``,
       ``safety``, ``answer``, ``判断``, ``结论``, ``安全性`` ...) and nothing else.
    2. Otherwise each line, without Markdown emphasis, headings, bullets, quotes and brackets, is
       either ``key: value`` with a verdict key (``Safety: Unsafe``, ``安全性：不安全``,
       ``【判断】：安全``, a JSON line cut off by ``max_tokens``) - read by its value -, or
       ``key: value`` whose key is itself a verdict word asked as a yes/no question (``Harmful: no``,
       ``Harmful request: yes``, ``有害：否``, ``是否违规：是``, ``Safe: no``, ``unsafe: false``): a
       yes / true / 是 / 有 answers that word, no / false / none / 否 / 无 / 没有 / 不是 the other
       label, what follows the value is explanation (``有害：否（不涉及A6暴力内容）`` is safe); a hedge
       (``Harmful: maybe``, ``有害：可能``) or a verdict word as the value is an abstention; any other
       value is explanation after a verdict word (``Unsafe: the prompt asks ...``), a statement.
       Otherwise the line is a statement.
    3. A statement (a whole line or value) is a verdict when a verdict word opens it, optionally
       after a short lead whose predicate it is: subject, copula, adverb ("该内容不安全。",
       "这条提示词属于不安全内容", "The prompt is unsafe.", "结论是不安全"). The word must end
       there: an English word at a non-letter, a Chinese one (after an optional 的 and 内容 / 输入 /
       请求 ...) at a non-ideograph, so "安全隐患很大", "合规风险高", "安全性较低", "Safety",
       "Safeguarding ..." are not verdicts, and "不安全" never reads as 安全. What follows is
       explanation and not read ("不安全，因为涉及暴力", "安全，但需注意隐私"), unless it offers the
       other label as an alternative ("安全/不安全", "safe or unsafe?") or names it right after a
       contrast ("安全，但是有害", "safe, but harmful"): ambiguous.
    4. Verdict-key lines that give a verdict decide when there are any (explanations in other
       lines are not read); otherwise the statement lines do. They must agree: "安全" and "不安全"
       on two lines, or an ambiguous line, is an abstention, as is an answer with no verdict
       (refusals, "Safety: Controversial", junk).

    Verdict words: 不安全 / 不合规 / 有害 / 违规 / unsafe / not safe / harmful; 安全 / 无害 / 合规 /
    safe / harmless / benign (any case).
    """
    answer = strip_thinking(text or "")
    answer = "\n".join(ln for ln in answer.splitlines() if not ln.strip().startswith("```")).strip()
    is_json, verdict = _from_json(answer) if answer.startswith("{") else (False, None)
    if is_json:
        return verdict
    keyed, statements = [], []
    for line in answer.splitlines():
        line = _clean(line)
        if not line:
            continue
        kv = _KEY_VALUE.match(line)
        word = _word_key(kv["key"]) if kv else None
        answered = _about_word(word, kv["value"]) if word and kv["value"].strip() else None
        if answered is not None:
            keyed.append(answered)
        elif kv and _is_verdict_key(kv["key"]):
            if kv["value"].strip():
                keyed.append(_statement(kv["value"]))
        else:
            statements.append(_statement(line))
    return _settle([v for v in keyed if v] or statements or [None])


# ------------------------------------------------------------------------------------------------
# The jury's decision


def strict_majority(judges: int) -> int:
    """The default quorum: a strict majority of the judges (``n // 2 + 1``: 3 of 4, 2 of 3)."""
    return judges // 2 + 1


@dataclass(frozen=True)
class Decision:
    """The jury's outcome for one row: ``label`` is ``None`` when the adjudicator must decide."""

    label: str | None
    valid_votes: int
    tie: bool            # enough valid votes, split evenly
    below_quorum: bool   # fewer valid votes than the quorum (including none)


def decide(verdicts: Sequence[str | None], *, min_valid_votes: int | None = None) -> Decision:
    """Quorum, then strict majority of the valid votes.

    With ``n`` judges, ``v`` valid votes of which ``u`` say unsafe, and quorum ``q``
    (``min_valid_votes``; default :func:`strict_majority` of ``n``): if ``v < q`` no label (the row
    goes to the adjudicator: one vote of four never decides a row); else ``unsafe`` if ``u > v/2``,
    ``safe`` if ``v - u > v/2``, otherwise a tie and no label. Abstentions (``None``) do not count:
    with ``q = 3``, 2-1 with one abstention is a majority, 2-2 a tie, 2-0 below the quorum.
    """
    quorum = strict_majority(len(verdicts)) if min_valid_votes is None else min_valid_votes
    if not 1 <= quorum <= max(len(verdicts), 1):
        raise ValueError(f"min_valid_votes must be between 1 and the number of judges ({len(verdicts)}), "
                         f"got {quorum}")
    valid = [v for v in verdicts if v in LABELS]
    if len(valid) < quorum:
        return Decision(None, len(valid), False, True)
    unsafe = sum(v == UNSAFE for v in valid)
    safe = len(valid) - unsafe
    if 2 * unsafe > len(valid):
        return Decision(UNSAFE, len(valid), False, False)
    if 2 * safe > len(valid):
        return Decision(SAFE, len(valid), False, False)
    return Decision(None, len(valid), True, False)


# ------------------------------------------------------------------------------------------------
# The cascade: judges asked in order, a row no longer asked once its label is fixed


def settled_label(verdicts: Sequence[str | None], judges: int, *, min_valid_votes: int | None = None) -> str | None:
    """The label the full jury of ``judges`` must give a row whose first judges voted ``verdicts``,
    or ``None`` while it is open.

    Open means: some way the judges still to come could vote (``safe``, ``unsafe``, or no valid vote:
    an abstention or a failed request) gives another outcome of :func:`decide`. A row is settled
    only on a label, never on "to the adjudicator": a row that may need the adjudicator is asked of
    every judge, so the adjudicator sees the votes the full jury would show it. With 4 judges and the
    default quorum 3, three agreeing votes settle a row (a fourth cannot undo a 3-1 majority); 2-1
    and any abstention among the first three do not."""
    quorum = strict_majority(judges) if min_valid_votes is None else min_valid_votes
    rest = judges - len(verdicts)
    if rest < 0:
        raise ValueError(f"{len(verdicts)} verdicts for a jury of {judges}")
    outcomes = {decide([*verdicts, *tail], min_valid_votes=quorum).label
                for tail in itertools.product((SAFE, UNSAFE, None), repeat=rest)}
    return outcomes.pop() if len(outcomes) == 1 and None not in outcomes else None


def votes_before_settling(judges: int, *, min_valid_votes: int | None = None) -> int:
    """The fewest votes that can settle a row (:func:`settled_label`): how many judges every row is
    asked before the cascade can stop (``judges`` when no shorter pattern settles)."""
    for k in range(1, judges + 1):
        if any(settled_label(list(p), judges, min_valid_votes=min_valid_votes) is not None
               for p in itertools.product((SAFE, UNSAFE), repeat=k)):
            return k
    return judges


# ------------------------------------------------------------------------------------------------
# The adjudicator


def parse_code(text: str, codes: Iterable[str]) -> str | None:
    """The micro-category code (``A1`` ... ``E2``, any case) that ``text`` names, if it names
    exactly one of ``codes``; two different ones ("B3 或 C2") cannot be told apart: ``None``.

    A code is a whole token: no ASCII letter or digit on either side ("A10", "a 2-step", "B2B",
    "e2e", "B5G" are not codes) and no ideograph glued after it, except 类: "A4纸", "C2C平台" are
    words, "属于B3类" and "类别：B3。" name B3. Codes outside ``codes`` ("A9") are ignored.
    """
    allowed = set(codes)
    found = {m.upper() for m in _CODE.findall(strip_thinking(text or ""))} & allowed
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class Adjudication:
    label: str | None
    micro: str | None
    problem: str  # "" when usable, else a reason code


def parse_adjudication(text: str, *, need_label: bool, codes: Iterable[str]) -> Adjudication:
    """An adjudicator answer -> (label, micro code, problem).

    ``need_label``: the jury had no majority, so the answer must give a verdict, read exactly as a
    judge's (:func:`parse_verdict`: "不安全 B3", "Safety: Unsafe\nCategories: B3", JSON), with a
    code when it is unsafe (:func:`parse_code`: exactly one valid code). Otherwise the row is
    already unsafe and only the code is read. Problems: ``adjudicator_unparseable`` (no verdict,
    or an ambiguous one), ``adjudicator_invalid_code`` (unsafe without exactly one of ``codes``).
    """
    codes = tuple(codes)
    label = parse_verdict(text) if need_label else UNSAFE
    if label is None:
        return Adjudication(None, None, "adjudicator_unparseable")
    if label == SAFE:
        return Adjudication(SAFE, None, "")
    code = parse_code(text, codes)
    if code is None:
        return Adjudication(UNSAFE, None, "adjudicator_invalid_code")
    return Adjudication(UNSAFE, code, "")


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa (``statsmodels.stats.inter_rater.fleiss_kappa``) for ``N`` items each rated by
    the same number ``n`` of raters into ``k`` categories; ``counts[i][j]`` = raters who put item
    ``i`` in category ``j``.

        P_i  = (sum_j n_ij^2 - n) / (n (n - 1))          agreement on item i
        P̄    = mean_i P_i
        p_j  = sum_i n_ij / (N n)                         share of category j
        P̄_e  = sum_j p_j^2
        κ    = (P̄ - P̄_e) / (1 - P̄_e)

    Returns ``None`` where statsmodels would divide by zero: no items, fewer than 2 raters, or every
    rating in one category (``P̄_e = 1``). Items must all have the same ``n`` (statsmodels only
    asserts it).
    """
    rows = [list(r) for r in counts if sum(r) > 0]
    if not rows:
        return None
    n = sum(rows[0])
    if any(sum(r) != n for r in rows):
        raise ValueError("fleiss_kappa: every item needs the same number of ratings")
    used = sum(any(r[j] for r in rows) for j in range(len(rows[0])))
    if n < 2 or used < 2:
        return None
    from statsmodels.stats import inter_rater  # here: half a second to import, and config imports us

    return float(inter_rater.fleiss_kappa(rows, method="fleiss"))


class AgreementReport:
    """Streaming accumulator for the agreement report of a labelled dataset.

    Feed it rows (``add``) with the final label, the votes of each judge, how the label was decided,
    and the source label; ``result()`` gives per-judge agreement with the final label, Fleiss' kappa
    over the rows where every judge gave a valid verdict, tie / below-quorum / abstention /
    adjudication rates and flips per source and per macro category. ``min_valid_votes`` is the
    jury's quorum (default: a strict majority of ``judges``).
    """

    def __init__(self, judges: Sequence[str], *, min_valid_votes: int | None = None):
        self.judges = list(judges)
        self.quorum = strict_majority(len(self.judges)) if min_valid_votes is None else min_valid_votes
        self.rows = 0
        self.agree = Counter()      # judge -> votes equal to the final label
        self.valid = Counter()      # judge -> valid votes
        self.abstain = Counter()    # judge -> abstentions
        self.kappa_counts: list[tuple[int, int]] = []
        self.ties = self.below_quorum = self.no_votes = self.adjudicated = 0
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
        outcome = decide(verdicts, min_valid_votes=self.quorum)
        self.ties += outcome.tie
        self.below_quorum += outcome.below_quorum
        self.no_votes += outcome.valid_votes == 0
        self.adjudicated += decision == ADJUDICATED
        for key, value in (("source", source or "?"), ("macro", macro or "?")):
            self.totals[key][value] += 1
            if source_label in LABELS and source_label != label:
                self.flips[key][value] += 1

    def result(self) -> dict:
        def rate(x, n):
            return round(x / n, 4) if n else None

        return {
            "rows": self.rows,
            "judges": {j: {"valid_votes": self.valid[j], "abstentions": self.abstain[j],
                           "abstention_rate": rate(self.abstain[j], self.rows),
                           "agreement_with_final": rate(self.agree[j], self.valid[j])}
                       for j in self.judges},
            "fleiss_kappa": fleiss_kappa(self.kappa_counts),
            "fleiss_kappa_rows": len(self.kappa_counts),
            "min_valid_votes": self.quorum,
            "ties": self.ties,
            "tie_rate": rate(self.ties, self.rows),
            "below_quorum": self.below_quorum,
            "below_quorum_rate": rate(self.below_quorum, self.rows),
            "no_valid_vote_rate": rate(self.no_votes, self.rows),
            "adjudicated": self.adjudicated,
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
              f"- rows with fewer than {report['min_valid_votes']} valid votes: {report['below_quorum_rate']} "
              f"({report['below_quorum']} rows; no valid vote at all: {report['no_valid_vote_rate']})",
              f"- tie rate: {report['tie_rate']}; adjudicated: {report['adjudication_rate']}", ""]
    for key in ("source", "macro"):
        lines += [f"## Flips of the source label per {key}", "", f"| {key} | rows | flipped | rate |",
                  "|---|---|---|---|"]
        for value, f in report["flips"][key].items():
            lines.append(f"| {value} | {f['rows']} | {f['flipped']} | {f['rate']} |")
        lines.append("")
    return "\n".join(lines)
