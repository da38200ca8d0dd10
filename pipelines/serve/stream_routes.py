"""The two streaming routes of the guard's ingress: ``POST /v1/moderations/stream`` and the guarded
``POST /v1/chat/completions`` (:mod:`pipelines.serve.stream` holds the hold-back logic,
:mod:`pipelines.serve.proxy` the OpenAI formats and the upstream).

``/v1/moderations/stream`` reads a body of newline-delimited JSON as it arrives (HTTP/1.1 chunked upload;
a client that cannot stream a body sends the same lines at once) and answers with server-sent events:

    {"prompt": "the user's message", "policy": ["A"], "threshold": 0.5}   <- first line (policy, threshold optional)
    {"delta": "the assistant's "}                                       <- one line per chunk of the answer
    {"delta": "next words"}
    (end of body = end of the answer)

    event: verdict   data: {"label", "flagged", "score", "category", "released", "judged_tokens", "tokens",
                            "released_tokens", "held_tokens", "chunks"}     <- after each judgement
    event: block     data: {... the flagged verdict}                        <- flagged: the stream ends here
    event: done      data: {... the verdict on the whole answer, the rest released}
    event: error     data: {"error": {...}}                                  <- a failure after the stream began

Both routes are handlers called with the ingress (``guard``: its ``config``, ``tokenizer``, ``taxonomy``,
``_verdicts``, ``_policy`` and ``metrics``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from pipelines.serve.policy import apply_policy
from pipelines.serve.proxy import (
    CONTENT_FILTER,
    ProxyConfig,
    UpstreamStream,
    chunk,
    content_deltas,
    last_user_text,
    upstream_headers,
    upstream_request,
)
from pipelines.serve.stream import (
    HoldBack,
    StreamRequestError,
    judgement_event,
    moderate,
    ndjson_lines,
    sse,
    token_starts,
    verdict_fields,
)

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
HEADER_FIELDS = ("prompt", "policy", "threshold")


def _threshold(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise StreamRequestError(f"`threshold` must be a number in [0, 1], got {value!r}", "threshold")
    return float(value)


def _judge(guard, prompt: str, threshold: float | None, policy):
    async def judge(text: str):
        ((verdict, _),) = await guard._verdicts([{"text": prompt, "response": text}], threshold=threshold)
        return apply_policy(verdict, policy)
    return judge


def _hold(guard) -> HoldBack:
    s = guard.config.stream
    return HoldBack(starts_of=lambda text: token_starts(guard.tokenizer, text), hold_back=s.hold_back_tokens,
                    judge_every=s.judge_every_tokens)


def _error_data(exc: Exception) -> dict[str, Any]:
    """An exception as the ``error`` event's data (an ``ApiError``'s status, type and message)."""
    status = getattr(exc, "status", 500)
    kind = getattr(exc, "kind", "stream_error")
    message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    return {"error": {"message": message, "type": kind, "param": getattr(exc, "param", None), "code": status}}


def _parse_line(line: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise StreamRequestError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise StreamRequestError(f"{what} must be a JSON object")
    return value


async def _deltas(lines: AsyncIterator[bytes]) -> AsyncIterator[str]:
    n = 1
    async for line in lines:
        n += 1
        value = _parse_line(line, f"line {n}")
        if set(value) != {"delta"} or not isinstance(value["delta"], str):
            raise StreamRequestError(f"line {n} must be {{\"delta\": \"<text>\"}}, got keys {sorted(value)}", "delta")
        yield value["delta"]


async def moderations_stream(guard, request: Request) -> StreamingResponse:
    lines = ndjson_lines(request.stream())
    try:
        first = await lines.__anext__()
    except StopAsyncIteration:
        raise StreamRequestError("empty body: the first line is {\"prompt\": ...}, then {\"delta\": ...} "
                                 "lines") from None
    header = _parse_line(first, "line 1 (the header)")
    unknown = sorted(set(header) - set(HEADER_FIELDS))
    if unknown:
        raise StreamRequestError(f"line 1: unknown field(s) {', '.join(unknown)} (prompt, policy, threshold; "
                                 "the answer's chunks follow as {\"delta\": ...} lines)", unknown[0])
    prompt = header.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise StreamRequestError("line 1 needs `prompt`, the user's message (a non-empty string)", "prompt")
    threshold, policy = _threshold(header.get("threshold")), guard._policy(header)
    judge = _judge(guard, prompt, threshold, policy)

    async def events() -> AsyncIterator[bytes]:
        last = None
        try:
            async for judgement in moderate(_deltas(lines), judge, _hold(guard), coalesce=False):
                last = judgement
                yield sse(*judgement_event(judgement, guard.taxonomy))
            if last is None:
                yield sse("done", {"released": "", "tokens": 0, "released_tokens": 0, "held_tokens": 0,
                                   "flagged": False, "label": None, "score": None, "category": None})
        except Exception as exc:  # after the 200 went out: an error event ends the stream
            yield sse("error", _error_data(exc))
        if last is not None:
            guard.metrics.verdicts([last.verdict])

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


# ------------------------------------------------------------------------------------------------
# The guarded proxy


async def chat_completions(guard, request: Request, body: dict[str, Any]):
    config: ProxyConfig = guard.config.proxy
    if not config.upstream_base_url:
        return JSONResponse({"error": {"message": "no upstream model: set proxy.upstream_base_url to serve "
                                       "/v1/chat/completions", "type": "not_found", "param": None, "code": 404}},
                            status_code=404)
    prompt = last_user_text(body.get("messages"))
    threshold, policy = _threshold(body.get("threshold")), guard._policy(body)
    judge = _judge(guard, prompt, threshold, policy)
    forward = upstream_request(body, config)
    url = config.upstream_base_url.rstrip("/") + "/chat/completions"
    client = httpx.AsyncClient(timeout=config.timeout_s)
    if not body.get("stream"):
        try:
            answer = await client.post(url, json=forward, headers=upstream_headers(config))
        except httpx.HTTPError as exc:
            return _upstream_error(f"unreachable ({type(exc).__name__}: {exc})")
        finally:
            await client.aclose()
        if answer.status_code != 200:
            return _upstream_error(f"answered {answer.status_code}: {_message(answer.text)}")
        data = answer.json()
        message = data["choices"][0]["message"]
        verdict = await judge(message.get("content") or "") if (message.get("content") or "").strip() else None
        if verdict is not None:
            guard.metrics.verdicts([verdict])
            data["guard"] = verdict_fields(verdict, guard.taxonomy)
            if verdict.flagged:
                message["content"] = None
                data["choices"][0]["finish_reason"] = CONTENT_FILTER
        return JSONResponse(data)

    try:
        upstream = await client.send(client.build_request("POST", url, json=forward,
                                                          headers=upstream_headers(config)), stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        return _upstream_error(f"unreachable ({type(exc).__name__}: {exc})")
    if upstream.status_code != 200:
        text = (await upstream.aread()).decode(errors="replace")
        await upstream.aclose()
        await client.aclose()
        return _upstream_error(f"answered {upstream.status_code}: {_message(text)}")
    meta = UpstreamStream(model=forward.get("model", ""))

    async def events() -> AsyncIterator[bytes]:
        started, last = False, None
        try:
            async for judgement in moderate(content_deltas(upstream.aiter_lines(), meta), judge, _hold(guard)):
                last = judgement
                if judgement.released:
                    delta = {"content": judgement.released, **({} if started else {"role": "assistant"})}
                    started = True
                    yield sse(None, chunk(meta, delta))
                if judgement.blocked:  # the last judgement: moderate() stops reading the upstream
                    yield sse(None, chunk(meta, {}, CONTENT_FILTER, guard={
                        **verdict_fields(judgement.verdict, guard.taxonomy), "judged_tokens": judgement.judged_tokens,
                        "released_tokens": judgement.released_tokens}))
            if last is None or not last.blocked:
                extra = {"guard": verdict_fields(last.verdict, guard.taxonomy)} if last else {}
                yield sse(None, chunk(meta, {} if started else {"role": "assistant", "content": ""},
                                      meta.finish_reason or "stop", **extra))
                if meta.usage:
                    yield sse(None, {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                                     "model": meta.model, "choices": [], "usage": meta.usage})
        except Exception as exc:
            yield sse(None, _error_data(exc))
        finally:
            await upstream.aclose()
            await client.aclose()
        if last is not None:
            guard.metrics.verdicts([last.verdict])
        yield sse(None, "[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _message(text: str) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else its first 500 characters."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:500]


def _upstream_error(what: str) -> JSONResponse:
    return JSONResponse({"error": {"message": f"the upstream model {what}", "type": "upstream_error",
                                   "param": None, "code": 502}}, status_code=502)
