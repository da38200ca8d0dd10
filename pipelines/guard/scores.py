"""The first-token score of a guard's answer: ``P(unsafe)`` from the top log-probabilities of the
first answer token, for the scored adapters of guard evaluation (whose answer starts with ``safe`` /
``unsafe``: :data:`pipelines.guard.adapters.SCORED_ADAPTERS`) and for the served guard
(:mod:`pipelines.serve.moderation`).

:func:`unsafe_score`: the probabilities of the first tokens of every spelling of ``safe`` and
``unsafe`` - ``Safe``, `` SAFE`` ... - renormalised over the two; the tokens come from the guard's
tokenizer (:func:`first_tokens`, checked by :func:`check_answer_tokens`; guard evaluation reads them
once in the driver, :meth:`pipelines.evaluation.guard_eval.GuardEvalStage.answer_tokens`); neither
among the top log-probabilities, or none of the answer's own word: no score. Without a score the
prediction is the answer's label (:func:`decide_by_score`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pipelines.core.rows import SAFE, UNSAFE


class GuardEvalError(RuntimeError):
    """The evaluation cannot run as configured (a tokenizer that cannot score, a missing model)."""


def answer_spellings(word: str) -> list[str]:
    """The ways an answer may open with ``word``: lower, title and upper case, with and without a
    leading space (``safe``, ``Safe``, ``SAFE``, `` safe`` ...)."""
    return sorted({prefix + cased for cased in (word, word.capitalize(), word.upper()) for prefix in ("", " ")})


def answer_token_mass(first_logprobs: dict[str, float], tokens: Iterable[str]) -> float:
    """``Σ exp(logprob_t)`` over the top-k tokens ``t`` whose text, surrounding whitespace removed,
    is one of ``tokens`` (the first tokens of one answer word's spellings, :func:`first_tokens`).
    Whitespace is not part of an answer word (the answer position skips blank tokens and the parsers
    strip it); any other text, a shorter prefix (``s``, ``un``) or a longer word (``safety``), is a
    different token and does not count."""
    wanted = set(tokens)
    return sum(math.exp(logprob) for text, logprob in first_logprobs.items() if text.strip() in wanted)


def unsafe_score(first_logprobs: dict[str, float], answer_tokens: dict[str, list[str]],
                 answer_label: str | None = None) -> float | None:
    """``P(unsafe)`` from the first answer token's top-k log-probabilities, renormalised over the
    two answers: with ``p_u`` = :func:`answer_token_mass` of ``answer_tokens["unsafe"]`` (the first
    tokens of every spelling of ``unsafe``: ``unsafe``, ``Unsafe``, `` UNSAFE`` ...) and ``p_s``
    that of ``safe``,

        ``P(unsafe) = p_u / (p_u + p_s)``.

    A word whose first tokens are not in the top-k has ``p = 0`` there (they rank below every
    returned token), so only ``unsafe``'s tokens present give 1.0 and only ``safe``'s 0.0. Neither
    present: ``None``, no evidence; the decision falls back to the answer's text
    (:func:`decide_by_score`). ``answer_label``: what the answer's first line says, when its parser
    read it; if none of that word's tokens is in the top-k, the answer began with a spelling the
    top-k does not show (``**Safe**``, a split token) and the top-k cannot contradict it: ``None``.
    So a score only disagrees with a readable answer where the threshold says it should.
    """
    p_unsafe = answer_token_mass(first_logprobs, answer_tokens[UNSAFE])
    p_safe = answer_token_mass(first_logprobs, answer_tokens[SAFE])
    own = {UNSAFE: p_unsafe, SAFE: p_safe}.get(answer_label)
    if (not p_unsafe and not p_safe) or own == 0:
        return None
    return p_unsafe / (p_unsafe + p_safe)


def decide_by_score(answer_label: str, score: float | None, threshold: float) -> str:
    """``unsafe`` iff ``score >= threshold`` when there is a score, else the answer's label."""
    if score is None:
        return answer_label
    return UNSAFE if score >= threshold else SAFE


def first_tokens(tokenizer) -> dict[str, list[str]]:
    """The first tokens of each answer word (``safe``, ``unsafe``) in every spelling
    (:func:`answer_spellings`) as the tokenizer writes them at the start of an answer, surrounding
    whitespace removed; a blank token (a separate space) is skipped, as at the answer position: what
    :func:`unsafe_score` sums."""
    out = {}
    for word in (SAFE, UNSAFE):
        found = set()
        for spelling in answer_spellings(word):
            pieces = (tokenizer.decode([i]).strip() for i in tokenizer.encode(spelling, add_special_tokens=False))
            found.add(next((p for p in pieces if p), ""))  # the answer position skips blank tokens too
        out[word] = sorted(found - {""})
    return out


def check_answer_tokens(tokens: dict[str, list[str]], tokenizer_name: str) -> None:
    """The first-token score needs, for each word, first tokens that begin that word (in any case)
    and that the other word does not share: otherwise ``P(first token)`` cannot tell ``safe`` from
    ``unsafe``. Raises :class:`GuardEvalError` saying why."""
    safe, unsafe = tokens[SAFE], tokens[UNSAFE]
    problem = None
    if not safe or not unsafe:
        problem = "one of them has none (only whitespace)"
    elif set(safe) & set(unsafe):
        problem = f"they share {sorted(set(safe) & set(unsafe))}"
    elif not all(SAFE.startswith(t.lower()) for t in safe) or not all(UNSAFE.startswith(t.lower()) for t in unsafe):
        problem = "a first token does not begin its own word"
    if problem:
        raise GuardEvalError(
            f"tokenizer {tokenizer_name}: the first tokens of {SAFE!r} are {safe} and of {UNSAFE!r} "
            f"{unsafe}; {problem}, so the first-token probability cannot separate the answers. "
            "Set score: false to decide by the answer's text.")
