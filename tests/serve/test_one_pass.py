"""One-pass scoring (issue 32): the verdict from the answer's first token, the rest decoded only when needed,
gives the verdicts of decoding the whole answer (pure functions; the served comparison is in test_serve.py)."""

from __future__ import annotations

import math
import random
import re

import pytest

from pipelines.core.config import CONFIGS
from pipelines.core.taxonomy import load_taxonomy
from pipelines.guard.adapters import ChillGuardAdapter
from pipelines.serve.moderation import (
    Completion,
    GuardAnswerError,
    continuation_pattern,
    first_token_word,
    one_pass_verdict,
    read_verdict,
)

TAXONOMY = load_taxonomy(CONFIGS / "taxonomy.yaml")
CODES = frozenset(TAXONOMY.micro_codes)
# a tokenizer that splits `unsafe` as `un` + `safe` (the tiny model's does) and one that does not
TOKENS = {"safe": ["SAFE", "Safe", "safe"], "unsafe": ["UNSAFE", "Unsafe", "unsafe", "un"]}


def first_of(full: Completion) -> Completion:
    """What the 1-token request returns for the prompt that ``full`` answers (greedy: the same first step)."""
    return Completion(text=full.tokens[0], tokens=full.tokens[:1], token_logprobs=full.token_logprobs[:1],
                      top_logprobs=full.top_logprobs[:1], token_ids=[7],
                      finish_reason="stop" if len(full.tokens) == 1 else "length")


def rest_of(full: Completion) -> Completion:
    """What the continuation request returns from the prompt + the first token."""
    return Completion(text="".join(full.tokens[1:]), tokens=full.tokens[1:], token_logprobs=full.token_logprobs[1:],
                      top_logprobs=full.top_logprobs[1:], finish_reason="stop")


def one_pass(full: Completion, threshold: float) -> tuple[object, bool]:
    """The ingress's one-pass path on ``full``'s engine: ``(verdict, continued)``."""
    first = first_of(full)
    verdict = one_pass_verdict(first, TOKENS, CODES, threshold)
    if verdict is not None:
        return verdict, False
    return read_verdict(first.joined(rest_of(full)), TOKENS, CODES, threshold), True


def decided(verdict) -> tuple:
    return verdict.label, round(verdict.score, 12), verdict.micro, verdict.scored


def test_the_first_token_decides_safe_and_unspecified():
    safe = Completion(text="safe", tokens=["safe"], token_logprobs=[-0.05],
                      top_logprobs=[{"safe": -0.05, "unsafe": -3.0}], finish_reason="length")
    verdict = one_pass_verdict(safe, TOKENS, CODES, 0.5)
    assert verdict.label == "safe" and verdict.score == pytest.approx(math.exp(-3) / (math.exp(-3) + math.exp(-0.05)))
    assert verdict.micro is None and verdict.shares == {} and verdict.scored
    # a low threshold: unsafe, but the answer says safe, so it writes no code: decided without decoding
    low = one_pass_verdict(safe, TOKENS, CODES, 0.01)
    assert (low.label, low.micro) == ("unsafe", None)
    # unsafe at or above the threshold: the code is needed, decode the rest
    unsafe = Completion(text="unsafe", tokens=["unsafe"], token_logprobs=[-0.1],
                        top_logprobs=[{"unsafe": -0.1, "safe": -2.4}], finish_reason="length")
    assert one_pass_verdict(unsafe, TOKENS, CODES, 0.5) is None
    # ... and below a high threshold: safe, no code, no decoding
    assert one_pass_verdict(unsafe, TOKENS, CODES, 0.99).label == "safe"


@pytest.mark.parametrize("token", ["\n", "\n\n", " ", "s", "I", "**"])
def test_a_first_token_that_is_no_answer_word_is_decoded_on(token):
    """Blank first tokens (templates whose answers open with a newline), shorter prefixes a constrained
    decoding allows, other words: the one-pass verdict waits for the rest."""
    first = Completion(text=token, tokens=[token], token_logprobs=[-0.2],
                       top_logprobs=[{token: -0.2, "safe": -2.0, "unsafe": -2.5}], finish_reason="length")
    assert first_token_word(token, TOKENS) is None
    assert one_pass_verdict(first, TOKENS, CODES, 0.5) is None


def test_a_first_token_that_ends_the_answer_is_the_whole_answer():
    done = Completion(text="safe", tokens=["safe"], token_logprobs=[-0.1], top_logprobs=[{"safe": -0.1}],
                      finish_reason="stop")
    assert one_pass_verdict(done, TOKENS, CODES, 0.5).label == "safe"
    with pytest.raises(GuardAnswerError):
        one_pass_verdict(Completion(text="", tokens=[], finish_reason="stop"), TOKENS, CODES, 0.5)


def test_one_pass_gives_the_whole_answers_verdicts():
    """Random whole answers (verdict words in every spelling and split, blank openings, codes, junk, the
    sampled token sometimes outside the top-k as under a grammar's mask) and thresholds: one-pass scoring,
    continuing only where it must, gives read_verdict's label, score, code and `scored` on every one."""
    rng = random.Random(0)
    words = ["safe", "Safe", "SAFE", "unsafe", "Unsafe", "un", "s", "I", "\n", "safety"]
    continued = decided_first = 0
    for _ in range(4000):
        opening = ["\n"] if rng.random() < 0.15 else []
        head = rng.choice(words)
        if head == "un":
            body = ["un", "safe"]
        elif head == "s":
            body = ["s", "afe"]
        else:
            body = [head]
        if rng.random() < 0.6:
            body += ["\n", rng.choice(sorted(CODES) + ["Z9"])]
        tokens = opening + body
        tops = []
        for token in tokens:
            candidates = {w: -rng.uniform(0, 6) for w in rng.sample(words, 4)}
            if rng.random() < 0.9:  # greedy: the sampled token is the most likely one shown
                candidates[token] = max(candidates.values()) + rng.uniform(0, 1)
            tops.append(candidates)
        full = Completion(text="".join(tokens), tokens=tokens, token_logprobs=[t.get(tok, -5.0) for t, tok in
                                                                                zip(tops, tokens)],
                          top_logprobs=tops, finish_reason="stop")
        threshold = rng.choice([0.05, 0.3, 0.5, 0.7, 0.95])
        try:
            expected = read_verdict(full, TOKENS, CODES, threshold)
        except GuardAnswerError:
            with pytest.raises(GuardAnswerError):
                one_pass(full, threshold)
            continue
        got, went_on = one_pass(full, threshold)
        assert decided(got) == decided(expected), (full, threshold)
        continued += went_on
        decided_first += not went_on
    # both paths are exercised
    assert continued > 500 and decided_first > 500


def test_continuation_pattern_completes_a_constrained_answer():
    adapter = ChillGuardAdapter(TAXONOMY, CONFIGS / "prompts" / "guard.yaml")
    answers = adapter.answers()
    assert all(re.fullmatch(adapter.answer_pattern("prompt"), a) for a in answers)
    assert len(answers) == 1 + len(CODES)
    after_un = continuation_pattern(answers, "un")
    assert re.fullmatch(after_un, "safe\nB5") and not re.fullmatch(after_un, "safe")
    assert after_un.startswith("(safe\\n")
    after_unsafe = continuation_pattern(answers, "unsafe")
    assert {c for c in CODES if re.fullmatch(after_unsafe, f"\n{c}")} == CODES
    assert re.fullmatch(continuation_pattern(answers, "s"), "afe")
    assert continuation_pattern(answers, "safe") is None      # nothing goes on after a whole `safe`
    assert continuation_pattern(answers, "maybe") is None     # no answer starts so
