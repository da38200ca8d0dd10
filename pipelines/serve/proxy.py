"""The guarded chat proxy: any OpenAI-compatible model behind the guard's streaming moderation.

``POST /v1/chat/completions`` takes OpenAI's chat request, forwards it to the configured upstream
(:class:`ProxyConfig`: base URL, model name, API key from an environment variable) and answers in
OpenAI's format:

- ``stream: true``: the upstream's content deltas go through :func:`pipelines.serve.stream.moderate`
  (hold-back window, judged as a response-level row: the last user message and the answer so far) and
  out as ``chat.completion.chunk`` events carrying only released text. When the guard flags, the upstream
  is closed and the last chunk has ``finish_reason: "content_filter"`` (as OpenAI and Azure OpenAI end a
  filtered stream) and a ``guard`` extension field (score, category; OpenAI's chunk type has its own
  ``moderation``); then ``data: [DONE]``.
- non-streaming: the whole answer is judged once; a flagged one comes back with ``content: null`` and
  ``finish_reason: "content_filter"`` (Azure's non-streaming behaviour), plus ``guard``.

chillguard extensions in the request (the ``openai`` client sends them with ``extra_body``): ``policy``
(our codes, as on ``/v1/guard``) and ``threshold`` (0..1, this request's decision threshold); both are
removed before the request goes upstream. Only ``n: 1`` is served (one answer to moderate).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from pipelines.core.config import Strict
from pipelines.serve.stream import StreamRequestError

#: request fields that are ours, not the upstream's
EXTENSIONS = ("policy", "threshold")
CONTENT_FILTER = "content_filter"


class ProxyConfig(Strict):
    """The upstream model of ``/v1/chat/completions``; without ``upstream_base_url`` the route answers 404."""

    upstream_base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. "
                                          "http://llm:8000/v1 (the proxy posts to <base>/chat/completions)")
    upstream_model: str | None = Field(None, description="model name sent upstream (none: the request's)")
    upstream_api_key_env: str = Field("CHILLGUARD_UPSTREAM_API_KEY", description="environment variable with "
                                      "the upstream's bearer token (unset: no Authorization header)")
    timeout_s: float = Field(120, gt=0, description="upstream connect / read timeout")


def last_user_text(messages: Any) -> str:
    """The text of the last ``user`` message (string content, or the ``text`` parts of a content list):
    the prompt the guard reads the answer against. Raises :class:`StreamRequestError` when there is none."""
    if not isinstance(messages, list) or not messages:
        raise StreamRequestError("`messages` must be a non-empty list of chat messages", "messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content
                                  if isinstance(part, dict) and part.get("type") == "text")
            if isinstance(content, str) and content.strip():
                return content
    raise StreamRequestError("`messages` has no user message with text (the guard judges the answer to it)",
                             "messages")


def upstream_request(body: dict[str, Any], config: ProxyConfig) -> dict[str, Any]:
    """The request sent upstream: the caller's, less our extensions, with the configured model name."""
    if body.get("n", 1) != 1:
        raise StreamRequestError("`n` must be 1: the proxy moderates one answer", "n")
    out = {k: v for k, v in body.items() if k not in EXTENSIONS}
    if config.upstream_model:
        out["model"] = config.upstream_model
    elif not isinstance(out.get("model"), str):
        raise StreamRequestError("missing `model` (a string)", "model")
    return out


def upstream_headers(config: ProxyConfig) -> dict[str, str]:
    key = os.environ.get(config.upstream_api_key_env)
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


@dataclass
class UpstreamStream:
    """What the upstream's stream said besides the content: its id, model, the finish reason and usage."""

    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    model: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    finish_reason: str | None = None
    usage: dict | None = None


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data:`` payloads of a server-sent event stream, up to ``[DONE]``."""
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield data


async def content_deltas(lines: AsyncIterator[str], meta: UpstreamStream) -> AsyncIterator[str]:
    """The content deltas of choice 0 in an upstream ``chat.completion.chunk`` stream; its id, model,
    finish reason and usage go to ``meta``. A chunk that is not JSON raises ``ValueError``."""
    async for data in sse_data(lines):
        chunk = json.loads(data)
        meta.id, meta.model = chunk.get("id") or meta.id, chunk.get("model") or meta.model
        meta.created = chunk.get("created") or meta.created
        if chunk.get("usage"):
            meta.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                meta.finish_reason = choice["finish_reason"]
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content


def chunk(meta: UpstreamStream, delta: dict[str, Any], finish_reason: str | None = None,
          **extra: Any) -> dict[str, Any]:
    """One OpenAI ``chat.completion.chunk``."""
    return {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
