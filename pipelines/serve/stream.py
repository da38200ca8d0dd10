"""Streaming moderation: an assistant's answer judged as it is generated, released behind a hold-back window.

One stream is one conversation: a user ``prompt`` and the assistant's answer arriving chunk by chunk.
The guard judges the answer so far as a response-level row (``{"text": prompt, "response": text so
far}``, the guard format training used) and text reaches the caller only once it is followed by a
window of ``hold_back_tokens`` tokens that were judged safe with it (:class:`HoldBack`):

- after a safe judgement of the first ``n`` tokens, tokens ``[0, n - N)`` are released (``N`` =
  ``hold_back_tokens``, counted with the guard's tokenizer over the answer alone); the last ``N`` stay
  held, so a sentence that turns unsafe within ``N`` tokens is blocked before any of it goes out;
- a flagged judgement blocks the stream: nothing more is released, ever; held text is dropped;
- at the end of the answer the whole text is judged once more and, if safe, the rest is released;
- a judgement runs when ``judge_every_tokens`` new tokens arrived since the last one (and at the end);
  text is only ever released right after a judgement that covered it plus its window. The guarded
  proxy judges the chunks that arrived while a judgement ran together (:func:`moderate`'s ``coalesce``),
  so it never falls behind the generating model by more than one judgement;
  ``/v1/moderations/stream`` answers every chunk the client sent.

Prefix reuse: the answer is at the end of the guard prompt (``configs/prompts/guard.yaml``: only the
closing of the user turn and the assistant header follow it), so each judgement's prompt is the previous
one's plus the new tokens and that short suffix; vLLM's automatic prefix caching serves the shared
blocks (``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``, measured by
``benchmarks/stream_guard.py``).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import Field

from pipelines.core.config import Strict
from pipelines.core.taxonomy import Taxonomy
from pipelines.serve.moderation import Verdict


class StreamConfig(Strict):
    """Streaming moderation (``/v1/moderations/stream`` and the guarded ``/v1/chat/completions``)."""

    hold_back_tokens: int = Field(16, ge=0, description="tokens (the guard's tokenizer) held back behind the "
                                  "text released: text goes out only once it and this many tokens after it were "
                                  "judged safe")
    judge_every_tokens: int = Field(1, ge=1, description="judge again once this many new tokens arrived "
                                    "(1: every chunk); the end of the answer is always judged")


class StreamRequestError(ValueError):
    """A streaming request that cannot be read: one line, and the field it is about."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def token_starts(tokenizer, text: str) -> list[int]:
    """The character offset where each token of ``text`` starts (the guard's tokenizer, no special
    tokens). A byte-level token inside a multi-byte character starts at that character."""
    if not text:
        return []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [start for start, _ in encoded["offset_mapping"]]


def release_point(starts: list[int], n_chars: int, hold_back: int, final: bool) -> int:
    """How many characters of a text judged safe may go out.

    With ``n = len(starts)`` tokens judged: ``min(starts[n - N:])`` characters (the text before the
    first held token; ``N = hold_back``), 0 while ``n <= N``; the whole text (``n_chars``) when the
    judgement was the final one."""
    if final:
        return n_chars
    n = len(starts)
    if n <= hold_back:
        return 0
    return min(starts[n - hold_back:]) if hold_back else n_chars


@dataclass
class HoldBack:
    """The hold-back state of one stream (pure: no I/O). ``starts_of`` maps a text to its tokens' start
    offsets (:func:`token_starts` with the guard's tokenizer)."""

    starts_of: Callable[[str], list[int]]
    hold_back: int = 16
    judge_every: int = 1
    text: str = ""
    starts: list[int] = field(default_factory=list)
    judged_tokens: int = 0     # tokens of the last judgement
    judged_chars: int = 0      # characters of the last judgement
    released: int = 0          # characters released
    blocked: bool = False

    def add(self, chunk: str) -> None:
        if self.blocked:
            return
        self.text += chunk
        self.starts = self.starts_of(self.text)

    @property
    def tokens(self) -> int:
        return len(self.starts)

    def tokens_in(self, n_chars: int) -> int:
        """Tokens that start before character ``n_chars``."""
        return bisect.bisect_left(self.starts, n_chars)

    def due(self, final: bool) -> bool:
        """Whether to judge now: not blocked, some non-blank text not judged yet, and ``judge_every`` new
        tokens since the last judgement or the end of the answer."""
        if self.blocked or not self.text.strip() or len(self.text) == self.judged_chars:
            return False
        return final or self.tokens - self.judged_tokens >= self.judge_every

    def snapshot(self) -> tuple[str, list[int]]:
        """The text to judge now and its token starts (the answer may grow while it is judged)."""
        return self.text, list(self.starts)

    def judged(self, text: str, starts: list[int], flagged: bool, final: bool) -> str:
        """Record a judgement of ``text`` (a snapshot); the text it releases ("" when none or blocked)."""
        self.judged_tokens, self.judged_chars = len(starts), len(text)
        if flagged:
            self.blocked = True
            return ""
        upto = max(self.released, release_point(starts, len(text), self.hold_back, final))
        out, self.released = self.text[self.released:upto], upto
        return out


@dataclass(frozen=True)
class Judgement:
    """One judgement of a stream: the verdict on the first ``judged_tokens`` tokens, the text it released,
    and where the stream stands (``chunks`` received, ``tokens`` so far, ``released_tokens``)."""

    verdict: Verdict
    released: str
    judged_tokens: int
    tokens: int
    released_tokens: int
    chunks: int
    final: bool
    blocked: bool


async def moderate(chunks: AsyncIterator[str], judge: Callable[[str], Awaitable[Verdict]],
                   hold: HoldBack, *, coalesce: bool = True) -> AsyncIterator[Judgement]:
    """Judge ``chunks`` (the answer's text pieces, in order) as they arrive: one :class:`Judgement` per
    judgement, the last one ``final`` (the whole answer) or ``blocked``. With ``coalesce``, the chunks
    that arrived while a judgement ran are judged together by the next (a generating model faster than the
    guard: the stream never falls more than one judgement behind); without it every chunk gets its own
    judgement (a client that sends chunks and wants an answer to each). A chunk source that fails raises
    here; after a block the source is no longer read."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def read() -> None:
        try:
            async for chunk in chunks:
                await queue.put(chunk)
            await queue.put(end)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)

    reader = asyncio.create_task(read())
    received, ended, verdict = 0, False, None
    try:
        while not ended:
            items = [await queue.get()]
            while coalesce and not queue.empty():
                items.append(queue.get_nowait())
            for item in items:
                if item is end:
                    ended = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    hold.add(item)
                    received += 1
            if not hold.due(final=ended):
                if ended and verdict is not None:  # the last judgement read the whole answer: release the rest
                    released = hold.judged(*hold.snapshot(), flagged=False, final=True)
                    yield Judgement(verdict=verdict, released=released, judged_tokens=hold.tokens,
                                    tokens=hold.tokens, released_tokens=hold.tokens, chunks=received, final=True,
                                    blocked=False)
                continue
            text, starts = hold.snapshot()
            verdict = await judge(text)
            released = hold.judged(text, starts, verdict.flagged, final=ended)
            yield Judgement(verdict=verdict, released=released, judged_tokens=len(starts), tokens=hold.tokens,
                            released_tokens=hold.tokens_in(hold.released), chunks=received, final=ended,
                            blocked=hold.blocked)
            if hold.blocked:
                return
    finally:
        reader.cancel()


def verdict_fields(verdict: Verdict, taxonomy: Taxonomy) -> dict:
    """The verdict as a stream event carries it: label, flagged, score and the category by name."""
    category = None
    if verdict.micro:
        micro, macro = taxonomy.micro(verdict.micro), taxonomy.macro(verdict.micro)
        category = {"micro": micro.code, "micro_zh": micro.zh, "micro_en": micro.en,
                    "macro": macro.code, "macro_zh": macro.zh, "macro_en": macro.en}
    return {"label": verdict.label, "flagged": verdict.flagged, "score": round(verdict.score, 6),
            "category": category, "outside_policy": verdict.outside_policy}


def judgement_event(j: Judgement, taxonomy: Taxonomy) -> tuple[str, dict]:
    """``(SSE event name, data)`` of one judgement on ``/v1/moderations/stream``: ``verdict`` (the
    stream goes on), ``block`` (flagged: the stream ends, the held text is dropped) or ``done``."""
    name = "block" if j.blocked else "done" if j.final else "verdict"
    return name, {**verdict_fields(j.verdict, taxonomy), "released": j.released, "judged_tokens": j.judged_tokens,
                  "tokens": j.tokens, "released_tokens": j.released_tokens,
                  "held_tokens": 0 if j.blocked else j.tokens - j.released_tokens, "chunks": j.chunks}


def sse(event: str | None, data: dict | str) -> bytes:
    """One server-sent event (``event:`` line when named, one ``data:`` line of JSON)."""
    import json

    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ((f"event: {event}\n" if event else "") + f"data: {body}\n\n").encode()


async def ndjson_lines(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The non-blank lines of a streamed body, each as soon as its newline (or the end) arrives."""
    buffer = b""
    async for piece in body:
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer
