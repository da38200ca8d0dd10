"""Reading a guard completion into a verdict, and the ``/v1/guard`` answer (pure functions, no Ray).

The engine answers each prompt with a completion in the guard format training used
(:mod:`pipelines.guard.format`: ``safe`` or ``unsafe\\n<micro>``) plus, per generated token,
its log-probability and the top alternatives. From that:

- ``score`` = P(unsafe) from the answer's first token, exactly as guard evaluation computes it
  (:func:`pipelines.guard.scores.unsafe_score`: the probabilities of the first tokens of
  every spelling of ``safe`` and ``unsafe``, renormalised over the two). Without either in the top
  log-probabilities, or without the first line's own word, 1.0 / 0.0 by the answer's first line.
- ``unsafe`` iff ``score >= threshold``.
- ``shares``: ``{code: P(the code line is code)}`` (:func:`code_shares`), from which
  :mod:`pipelines.serve.categories` scores the categories of a ``/v1/moderations`` answer. A guard
  that answers ``safe`` writes no code line: no shares, and ``score`` alone says how close it was.

**One-pass scoring** (``scoring: one_pass``, the default): the engine generates the answer's first token
only (one forward pass over the prompt, its top log-probabilities), and :func:`one_pass_verdict` decides
from it; only an answer that must go on is continued, with a second request whose prompt is the guard
prompt + that first token (vLLM's prefix cache holds the prompt already: the second request prefills one
block) and :func:`read_verdict` reads the joined answer (:meth:`Completion.joined`) exactly as it reads a
full decode. So the verdicts (label, score, micro code) are those of decoding the whole answer; what a
one-pass verdict below the threshold lacks is the code line it never decoded: no ``shares``, so category
scores of a text that is not unsafe are 0 (``unspecified`` carries its score).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from actors.llm import first_answer_position, logprob_map
from pipelines.core.rows import SAFE, UNSAFE
from pipelines.core.taxonomy import Taxonomy
from pipelines.guard.format import GuardFormatError, parse_guard_answer
from pipelines.guard.scores import unsafe_score


class GuardAnswerError(ValueError):
    """A completion that yields no verdict: neither a score nor a readable first line."""


@dataclass(frozen=True)
class Completion:
    """One engine completion: its text and, per generated token, the token's text, its log-probability
    and the top alternatives ``{token text: logprob}`` (the OpenAI completions ``logprobs`` fields)."""

    text: str
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # with the request's return_token_ids
    finish_reason: str | None = None                   # stop (end of answer) | length (max_tokens)

    @classmethod
    def from_choice(cls, choice: Any) -> Completion:
        """From a completions choice: vLLM's object (read by attribute: no copy of the whole
        response) or its JSON dict."""
        get = ((lambda obj, key: obj.get(key)) if isinstance(choice, dict)
               else (lambda obj, key: getattr(obj, key, None)))
        logprobs = get(choice, "logprobs")
        field = (lambda key: list((logprobs.get(key) if isinstance(logprobs, dict) else getattr(logprobs, key)) or [])
                 ) if logprobs else (lambda key: [])
        return cls(text=get(choice, "text") or "", tokens=field("tokens"), token_logprobs=field("token_logprobs"),
                   top_logprobs=field("top_logprobs"), token_ids=list(get(choice, "token_ids") or []),
                   finish_reason=get(choice, "finish_reason"))

    def joined(self, rest: Completion) -> Completion:
        """This completion followed by ``rest``, the continuation generated from its prompt + its tokens:
        the answer a single request would have generated."""
        return Completion(text=self.text + rest.text, tokens=self.tokens + rest.tokens,
                          token_logprobs=self.token_logprobs + rest.token_logprobs,
                          top_logprobs=self.top_logprobs + rest.top_logprobs,
                          token_ids=self.token_ids + rest.token_ids, finish_reason=rest.finish_reason)


@dataclass(frozen=True)
class Verdict:
    label: str                     # safe / unsafe, by score and threshold
    score: float                   # P(unsafe)
    scored: bool                   # score from the first token's log-probabilities (else from the text)
    micro: str | None              # the code the answer names (None: safe, or no known code)
    shares: dict[str, float]       # micro code -> share of P(unsafe), see code_shares
    raw: str                       # the answer as generated
    outside_policy: bool = False   # unsafe with a code the caller's policy leaves out (pipelines.serve.policy)

    @property
    def flagged(self) -> bool:
        """Unsafe, and not outside the caller's policy (without a policy: unsafe)."""
        return self.label == UNSAFE and not self.outside_policy


def first_token_score(completion: Completion, answer_tokens: dict[str, list[str]],
                      answer_label: str | None = None) -> float | None:
    """P(unsafe) at the answer's first non-blank token (:func:`unsafe_score`; None: neither answer
    word's tokens in its top-k, or none of ``answer_label``'s, the label the first line reads)."""
    position = first_answer_position(completion.tokens)
    if position is None or position >= len(completion.top_logprobs):
        return None
    top = completion.top_logprobs[position] or {}
    return unsafe_score(logprob_map(list(top.items())), answer_tokens, answer_label)


_CODE_LINE = re.compile(r"^[^\n]*\n\s*([A-Za-z]\d+)", re.DOTALL)


def code_shares(completion: Completion, micro: str | None, codes: frozenset[str]) -> dict[str, float]:
    """``{code: P(the code line is code)}`` as far as the log-probabilities show it.

    The named code ``c`` (its characters span tokens ``i..j`` of the answer) gets
    ``exp(Σ_{t=i..j} logprob_t)``, the probability of generating exactly those tokens after the verdict
    line. When ``c`` is a single token, every other code that is itself a single token among that
    position's top alternatives gets its probability too (so single-token codes form a distribution).
    Codes the log-probabilities say nothing about get no entry (0). ``{}`` without a named code."""
    if not micro or not completion.tokens:
        return {}
    text = "".join(completion.tokens)
    found = _CODE_LINE.search(text.lstrip())
    if not found or found.group(1).upper() != micro:
        return {}
    start = len(text) - len(text.lstrip()) + found.start(1)
    end = start + len(micro)
    spans, offset = [], 0
    for i, token in enumerate(completion.tokens):
        if offset < end and offset + len(token) > start:
            spans.append(i)
        offset += len(token)
    logprobs = [completion.token_logprobs[i] if i < len(completion.token_logprobs) else None for i in spans]
    if not spans or any(lp is None for lp in logprobs):
        return {}
    shares = {micro: math.exp(sum(logprobs))}
    if len(spans) == 1 and completion.tokens[spans[0]].strip().upper() == micro:
        top = completion.top_logprobs[spans[0]] if spans[0] < len(completion.top_logprobs) else None
        for token, logprob in logprob_map(list((top or {}).items())).items():
            code = token.strip().upper()
            if code in codes and code != micro:
                shares[code] = shares.get(code, 0.0) + math.exp(logprob)
    return shares


def read_verdict(completion: Completion, answer_tokens: dict[str, list[str]], codes: frozenset[str],
                 threshold: float) -> Verdict:
    """The verdict of one completion (see the module docstring). Raises :class:`GuardAnswerError`
    when there is neither a first-token score nor a ``safe`` / ``unsafe`` first line."""
    try:
        label, micro = parse_guard_answer(completion.text, codes)
    except GuardFormatError as exc:
        label, micro, problem = None, None, exc
    score = first_token_score(completion, answer_tokens, label)
    if label is None and score is None:
        raise GuardAnswerError(f"the guard's answer has no verdict and no score: {problem}")
    scored = score is not None
    if score is None:
        score = 1.0 if label == UNSAFE else 0.0
    decided = UNSAFE if score >= threshold else SAFE
    # a code only goes with an unsafe verdict (a threshold above the answer's own can overrule it)
    named = micro if label == UNSAFE and decided == UNSAFE else None
    return Verdict(label=decided, score=score, scored=scored, micro=named,
                   shares=code_shares(completion, micro, codes), raw=completion.text)


def first_token_word(token: str | None, answer_tokens: dict[str, list[str]]) -> str | None:
    """``safe`` / ``unsafe`` when ``token`` (surrounding whitespace removed) is one of that word's first
    tokens (:func:`pipelines.guard.scores.first_tokens`), else ``None`` (a blank token, a shorter
    prefix, another word)."""
    text = (token or "").strip()
    return next((word for word in (SAFE, UNSAFE) if text in answer_tokens[word]), None)


def one_pass_verdict(first: Completion, answer_tokens: dict[str, list[str]], codes: frozenset[str],
                     threshold: float) -> Verdict | None:
    """The verdict from the answer's first generated token alone, or ``None`` when the rest of the
    answer must be decoded to give :func:`read_verdict`'s verdict.

    With ``w`` = :func:`first_token_word` of the token generated and ``p`` = :func:`unsafe_score` of its
    top log-probabilities (its own word ``w``), the answer is decided here iff ``w`` is a word, ``p`` is
    not ``None``, and not (``p >= threshold`` and ``w = unsafe``):

    - ``p < threshold``: ``safe``, no code (a code goes only with an unsafe verdict);
    - ``p >= threshold`` and ``w = safe``: ``unsafe`` without a code (the answer's line says safe, so it
      writes no code: ``unspecified``).

    ``None`` (decode the rest): ``w = unsafe`` at or above the threshold (the micro code is needed), a
    first token that is no answer word's (blank, as some templates open answers with a newline; a shorter
    prefix ``s`` / ``un`` that constrained decoding allowed; another word), or no score. A first token
    that ended the answer (``finish_reason`` ``stop``) is the whole answer: :func:`read_verdict` of it.
    These are :func:`read_verdict`'s decisions on the whole answer: its first line starts with ``w``, so
    it names a code only if ``w = unsafe``, and its first token, the one generated here, is in the top
    log-probabilities, so its own word has mass and ``p`` is the score it computes too."""
    if first.finish_reason == "stop":
        return read_verdict(first, answer_tokens, codes, threshold)
    word = first_token_word(first.tokens[0] if first.tokens else None, answer_tokens)
    if word is None or not first.top_logprobs or first.top_logprobs[0] is None:
        return None
    score = unsafe_score(logprob_map(list(first.top_logprobs[0].items())), answer_tokens, word)
    if score is None or (score >= threshold and word == UNSAFE):
        return None
    return Verdict(label=UNSAFE if score >= threshold else SAFE, score=score, scored=True, micro=None, shares={},
                   raw=first.text)


def _regex_literal(text: str) -> str:
    return "".join("\\n" if ch == "\n" else re.escape(ch) for ch in text)


def continuation_pattern(answers: list[str], prefix: str) -> str | None:
    """The regex of what may follow ``prefix`` (the answer's first token) in one of the well-formed
    ``answers`` (constrained decoding: the second request's grammar starts where the first stopped), as an
    alternation of the remainders of the answers that start with ``prefix``; ``None`` when no answer goes
    on from it."""
    rest = sorted({a[len(prefix):] for a in answers if a.startswith(prefix) and len(a) > len(prefix)})
    return f"({'|'.join(map(_regex_literal, rest))})" if rest else None


def guard_result(verdict: Verdict, taxonomy: Taxonomy, *, level: str, threshold: float, model: str,
                 latency_ms: float, prompt_tokens: int) -> dict[str, Any]:
    """The ``/v1/guard`` answer: the verdict with the category's names in Chinese and English, and
    the length of the guard prompt in tokens."""
    category = None
    if verdict.micro:
        micro, macro = taxonomy.micro(verdict.micro), taxonomy.macro(verdict.micro)
        category = {"micro": micro.code, "micro_zh": micro.zh, "micro_en": micro.en,
                    "macro": macro.code, "macro_zh": macro.zh, "macro_en": macro.en,
                    "share": round(verdict.shares.get(micro.code, 0.0), 6)}
    return {"label": verdict.label, "flagged": verdict.flagged, "score": round(verdict.score, 6),
            "scored": verdict.scored, "threshold": threshold, "category": category, "level": level,
            "answer": verdict.raw, "model": model, "prompt_tokens": prompt_tokens,
            "latency_ms": round(latency_ms, 2)}
