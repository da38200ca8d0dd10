"""Streaming moderation's hold-back logic and the proxy's OpenAI formats (pure, no Ray, no engine).

The judge here is a scripted guard (a text is unsafe once it contains a marker word): the checks are on
the release rule, which must hold whatever the guard says."""

from __future__ import annotations

import asyncio
import re

import pytest

from pipelines.serve.moderation import Verdict
from pipelines.serve.proxy import ProxyConfig, UpstreamStream, content_deltas, last_user_text, upstream_request
from pipelines.serve.stream import (
    HoldBack,
    StreamRequestError,
    moderate,
    ndjson_lines,
    release_point,
    token_starts,
)


def word_starts(text: str) -> list[int]:
    """A whitespace 'tokenizer': one token per word."""
    return [m.start() for m in re.finditer(r"\S+", text)]


def verdict(unsafe: bool, score: float | None = None) -> Verdict:
    return Verdict(label="unsafe" if unsafe else "safe", score=score if score is not None else float(unsafe),
                   scored=True, micro="B5" if unsafe else None, shares={}, raw="")


async def agen(items):
    for item in items:
        yield item
        await asyncio.sleep(0)


def run(chunks, hold_back=3, judge_every=1, marker="BAD", coalesce=False):
    judged: list[str] = []

    async def judge(text: str) -> Verdict:
        judged.append(text)
        await asyncio.sleep(0)
        return verdict(marker in text)

    async def collect():
        hold = HoldBack(starts_of=word_starts, hold_back=hold_back, judge_every=judge_every)
        return [j async for j in moderate(agen(chunks), judge, hold, coalesce=coalesce)], judged

    return asyncio.run(collect())


def test_release_point():
    starts = [0, 4, 9, 15, 20]
    assert release_point(starts, 24, 2, final=False) == 15      # tokens 0..2 out, 3 and 4 held
    assert release_point(starts, 24, 5, final=False) == 0       # not more tokens than the window
    assert release_point(starts, 24, 2, final=True) == 24      # the final judgement releases all
    assert release_point(starts, 24, 0, final=False) == 24
    assert release_point([0, 3, 2, 5], 6, 2, final=False) == 2  # a byte-level token inside a character


def test_safe_answer_is_released_behind_the_window_then_whole():
    words = [f"w{i} " for i in range(10)]
    judgements, judged = run(words, hold_back=3)
    released = "".join(j.released for j in judgements)
    assert released == "".join(words)
    assert judgements[-1].final and not judgements[-1].blocked
    for j in judgements[:-1]:  # before the end: at most judged - N tokens out, and never unjudged text
        assert j.released_tokens <= max(0, j.judged_tokens - 3)
    # every released piece was covered by a judgement made before it went out
    out = ""
    for j, text in zip(judgements, judged):
        out += j.released
        assert text.startswith(out)


def test_flagged_text_is_never_released():
    words = [f"w{i} " for i in range(6)] + ["BAD "] + [f"v{i} " for i in range(5)]
    for hold_back in (1, 2, 3):
        judgements, _ = run(words, hold_back=hold_back)
        released = "".join(j.released for j in judgements)
        assert "BAD" not in released and judgements[-1].blocked and not judgements[-1].final
        assert sum(j.blocked for j in judgements) == 1
        # judged after every token: the block comes at the marker; the last safe judgement read 6 tokens, 6 - N are out
        assert released == "".join(words[:max(0, 6 - hold_back)])


def test_throttled_judging_still_judges_before_release_and_at_the_end():
    words = [f"w{i} " for i in range(11)]
    judgements, judged = run(words, hold_back=2, judge_every=4)
    # judged at 4 and 8 tokens (the scripted source is faster than nothing: each chunk is one token), then at the end
    assert [j.judged_tokens for j in judgements] == [4, 8, 11]
    assert [j.released_tokens for j in judgements] == [2, 6, 11]
    assert len(judged) == 3


def test_coalescing_judges_what_arrived_during_a_judgement_together():
    """A source far faster than the guard: with coalescing, far fewer judgements, the same release rule."""
    words = [f"w{i} " for i in range(40)]

    async def collect(coalesce):
        judged = []

        async def slow_judge(text):
            judged.append(text)
            await asyncio.sleep(0.01)
            return verdict(False)

        hold = HoldBack(starts_of=word_starts, hold_back=3)
        return [j async for j in moderate(agen(words), slow_judge, hold, coalesce=coalesce)], judged

    each, _ = asyncio.run(collect(False))
    together, judged = asyncio.run(collect(True))
    assert len(judged) <= len(together)  # the end needs no judgement when the last one read everything
    assert len(each) == 41 and len(together) < 10  # 40 chunks + the release at the end
    assert "".join(j.released for j in together) == "".join(words)
    for j in together[:-1]:
        assert j.released_tokens <= max(0, j.judged_tokens - 3)


def test_a_blank_answer_is_never_judged_and_a_blocked_stream_ignores_more_text():
    judgements, judged = run(["  ", "\n"])
    assert judgements == [] and judged == []
    hold = HoldBack(starts_of=word_starts, hold_back=1)
    hold.add("BAD word")
    text, starts = hold.snapshot()
    assert hold.judged(text, starts, flagged=True, final=False) == "" and hold.blocked
    hold.add(" more")
    assert hold.text == "BAD word" and not hold.due(final=True)


def test_source_errors_reach_the_caller():
    async def broken():
        yield "w1 w2 "
        raise ValueError("upstream went away")

    async def collect():
        hold = HoldBack(starts_of=word_starts, hold_back=1)
        return [j async for j in moderate(broken(), lambda t: asyncio.sleep(0, verdict(False)), hold)]

    with pytest.raises(ValueError, match="upstream went away"):
        asyncio.run(collect())


def test_token_starts_with_the_tiny_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["causal-lm"])
    text = "好的，下面是 steps: 第一步"
    starts = token_starts(tok, text)
    assert len(starts) == len(tok(text, add_special_tokens=False)["input_ids"])
    assert starts[0] == 0 and all(0 <= s < len(text) for s in starts)
    assert token_starts(tok, "") == []


def test_ndjson_lines_split_across_pieces():
    async def collect():
        return [line async for line in ndjson_lines(agen([b'{"a"', b': 1}\n\n{"b": ', b'2}\n{"c": 3}']))]

    assert asyncio.run(collect()) == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']


def test_proxy_request_and_deltas():
    assert last_user_text([{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                           {"role": "user", "content": [{"type": "text", "text": "second"}]}]) == "second"
    with pytest.raises(StreamRequestError, match="no user message"):
        last_user_text([{"role": "system", "content": "be nice"}])
    with pytest.raises(StreamRequestError, match="non-empty list"):
        last_user_text("hello")
    body = {"model": "m", "messages": [], "stream": True, "policy": ["A"], "threshold": 0.3}
    assert upstream_request(body, ProxyConfig(upstream_model="up")) == {"model": "up", "messages": [], "stream": True}
    with pytest.raises(StreamRequestError, match="`n` must be 1"):
        upstream_request({**body, "n": 2}, ProxyConfig())
    lines = ['data: {"id": "c1", "model": "up", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}', "",
             'data: {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}', ": keep-alive",
             'data: {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}',
             'data: {"id": "c1", "choices": [], "usage": {"total_tokens": 3}}', "data: [DONE]",
             'data: {"never": "read"}']
    meta = UpstreamStream()

    async def collect():
        return [d async for d in content_deltas(agen(lines), meta)]

    assert asyncio.run(collect()) == ["Hel", "lo"]
    assert (meta.id, meta.model, meta.finish_reason, meta.usage) == ("c1", "up", "stop", {"total_tokens": 3})
