"""The guard's HTTP ingress: a Ray Serve deployment wrapping a FastAPI app.

Routes: ``POST /v1/moderations`` (OpenAI's shape; our codes or OpenAI's categories as the request's
``model`` selects, :mod:`pipelines.serve.categories`), ``POST /v1/guard`` (our richer answer); both take a
per-request ``policy``, the codes that count for the caller (:mod:`pipelines.serve.policy`),
``POST /v1/moderations/stream`` and the guarded ``POST /v1/chat/completions`` (streaming moderation,
:mod:`pipelines.serve.stream_routes`), ``GET /healthz`` (liveness: the ingress answers), ``GET /readyz``
(readiness: 200 once a warm-up guard request went through the engine, 503 before), ``GET /`` (the
playground page). Each prompt is rendered exactly as training rendered it
(:class:`pipelines.guard.format.GuardPrompt` + the model's chat template, as token ids), sent to the vLLM
replicas (``ray.serve.llm.LLMServer``) as completions with the answer tokens' log-probabilities, and
read by :mod:`pipelines.serve.moderation`: with ``scoring: one_pass`` (default) a 1-token completion
decides, and only answers that must go on (unsafe, to read the micro code) are continued by a second
request on the cached prompt; ``scoring: decode`` generates the whole answer (up to ``max_tokens``) in
one request.

Batching: every engine request goes through a ``@serve.batch`` method (one per kind: first tokens,
continuations, whole answers), so the prompts of concurrent callers (and the N texts of one list input)
reach the engine as one completions request of up to ``max_batch_size`` prompts; vLLM's continuous
batching then runs them in the same engine steps.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad
input or invalid JSON, 401 a missing / wrong bearer token, 404 unknown route, 413 a list over
``max_inputs`` or a prompt over the context, 502 an answer that yields no verdict, 503 overload
(with ``Retry-After``) or an unavailable engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.core.prompts import prompt_token_ids
from pipelines.core.taxonomy import load_taxonomy
from pipelines.serve import stream_routes
from pipelines.serve.categories import OPENAI, moderation_result, select_categories
from pipelines.serve.config import GuardServeConfig
from pipelines.serve.moderation import (
    Completion,
    GuardAnswerError,
    Verdict,
    continuation_pattern,
    guard_result,
    one_pass_verdict,
    read_verdict,
)
from pipelines.serve.observability import ServeMetrics
from pipelines.serve.openai_mapping import load_openai_mapping
from pipelines.serve.policy import (
    Policy,
    PolicyError,
    apply_policy,
    guard_policy_fields,
    moderation_policy_fields,
    parse_policy,
)
from pipelines.serve.stream import StreamRequestError

log = logging.getLogger(__name__)

PLAYGROUND = Path(__file__).with_name("playground.html")
#: routes anyone may call without the bearer token
OPEN_ROUTES = frozenset({"/", "/healthz", "/readyz"})
#: the text of the warm-up guard request that readiness waits for
WARMUP_TEXT = "warm-up: is the guard ready?"

api = FastAPI(title="chillguard guard", docs_url=None, redoc_url=None)


class ApiError(Exception):
    """An error answer: HTTP status, OpenAI error ``type``, message, the offending ``param``."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.headers = status, kind, message, param, headers


def error_response(status: int, kind: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.kind, exc.message, exc.param, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kinds = {404: "not_found", 405: "method_not_allowed"}
    message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), message)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, "invalid_request_error", str(exc))


def _texts(value: Any, param: str, *, allow_list: bool, max_inputs: int) -> list[str]:
    """A non-empty string, or (``allow_list``) a non-empty list of at most ``max_inputs`` of them."""
    if isinstance(value, str):
        value = [value]
    elif not (allow_list and isinstance(value, list)):
        kind = "a string or a list of strings" if allow_list else "a string"
        raise ApiError(400, "invalid_request_error", f"`{param}` must be {kind}, got {type(value).__name__}", param)
    if not value:
        raise ApiError(400, "invalid_request_error", f"`{param}` is an empty list", param)
    if len(value) > max_inputs:
        raise ApiError(413, "input_too_large", f"`{param}` has {len(value)} texts; at most {max_inputs} per "
                       "request (max_inputs)", param)
    for i, text in enumerate(value):
        where = param if len(value) == 1 else f"{param}[{i}]"
        if not isinstance(text, str):
            raise ApiError(400, "invalid_request_error",
                           f"`{where}` must be a string, got {type(text).__name__}", where)
        if not text.strip():
            raise ApiError(400, "invalid_request_error", f"`{where}` is empty", where)
    return value


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request_error", "the request body must be a JSON object")
    return body


@serve.deployment(name="GuardIngress")
@serve.ingress(api)
class GuardIngress:
    """Routes + prompt rendering + batching + answer reading, in front of the vLLM replicas."""

    def __init__(self, engine, config: dict[str, Any]):
        from pipelines.core.chat_templates import load_tokenizer
        from pipelines.guard.adapters import ChillGuardAdapter
        from pipelines.guard.scores import check_answer_tokens, first_tokens

        self.config = GuardServeConfig.model_validate(config)
        c = self.config
        self.taxonomy = load_taxonomy(c.taxonomy)
        self.openai_mapping = load_openai_mapping(c.openai_mapping, self.taxonomy.micro_codes)
        # guard evaluation's adapter: the same prompt, micro codes and answer regex
        adapter = ChillGuardAdapter(self.taxonomy, c.template)
        self.codes = adapter.codes
        self.prompt = adapter.prompt
        self.answers = adapter.answers()  # what a constrained continuation may complete
        self.structured = {"regex": adapter.answer_pattern("prompt")} if c.constrained else None
        self.tokenizer = load_tokenizer(c.model)  # a trained folder carries its template
        self.answer_tokens = first_tokens(self.tokenizer)
        check_answer_tokens(self.answer_tokens, c.model)
        self.context = c.max_model_len or _model_context(c.model)
        self.engine = engine.options(stream=True)
        for method in (self._complete, self._first_tokens, self._continuations):
            method.set_max_batch_size(c.max_batch_size)
            method.set_batch_wait_timeout_s(c.batch_wait_timeout_s)
        self.metrics = ServeMetrics(c.name)
        # read once; never logged or echoed
        self._key = os.environ.get(c.api_key_env) or None
        self._ongoing = 0
        self._page = PLAYGROUND.read_text(encoding="utf-8")
        # readiness: a warm-up guard request through the engine, started now (the constructor runs on the
        # replica's event loop) or by the first /readyz or health check
        self.ready, self.warmup_error, self._warmup = False, None, None
        self._start_warmup()
        log.info("guard ingress for %s: context %s tokens, batches of up to %d, scoring %s, auth %s", c.model,
                 self.context, c.max_batch_size, c.scoring, "on" if self._key else "off")

    # --- the engine ----------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def _complete(self, prompts: list[list[int]]) -> list[Completion]:
        """``scoring: decode``: the whole answers of the batch's prompts, one request."""
        self.metrics.batch(len(prompts), "decode")
        return await self._request(prompts, self.config.max_tokens, self.structured)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def _first_tokens(self, prompts: list[list[int]]) -> list[Completion]:
        """``scoring: one_pass``: the first answer token of each prompt (one forward pass), one request."""
        self.metrics.batch(len(prompts), "first_token")
        return await self._request(prompts, 1, self.structured)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def _continuations(self, items: list[tuple[list[int], str | None]]) -> list[Completion]:
        """``scoring: one_pass``: the rest of each answer, from ``(prompt + first token, continuation regex)``;
        one request per regex (constrained answers continue from different first tokens)."""
        groups: dict[str | None, list[int]] = {}
        for i, (_, regex) in enumerate(items):
            groups.setdefault(regex, []).append(i)
        out: list[Completion | None] = [None] * len(items)

        async def run(regex: str | None, where: list[int]) -> None:
            self.metrics.batch(len(where), "continuation")
            answers = await self._request([items[i][0] for i in where], self.config.max_tokens - 1,
                                          {"regex": regex} if regex else None)
            for i, answer in zip(where, answers):
                out[i] = answer

        await asyncio.gather(*(run(regex, where) for regex, where in groups.items()))
        return out

    async def _request(self, prompts: list[list[int]], max_tokens: int,
                       structured: dict[str, str] | None) -> list[Completion]:
        """One completions request (greedy, the top log-probabilities and the token ids of every answer
        token) for ``prompts``; the answers in prompt order."""
        from ray.serve.llm.openai_api_models import CompletionRequest

        c = self.config
        request = CompletionRequest(model=c.name, prompt=prompts, max_tokens=max_tokens, temperature=0.0,
                                    logprobs=c.top_logprobs, stream=False, structured_outputs=structured,
                                    return_token_ids=True)
        answer = None
        async for answer in self.engine.completions.remote(request):  # noqa: B007  (keeps the first answer)
            break
        choices = getattr(answer, "choices", None)
        if choices is None:  # vLLM's ErrorResponse (or nothing)
            error = getattr(answer, "error", None) or answer
            raise ApiError(502, "engine_error", f"the engine refused the batch: {getattr(error, 'message', error)}")
        ordered = sorted(choices, key=lambda choice: choice.index)
        if len(ordered) != len(prompts):
            raise ApiError(502, "engine_error", f"the engine answered {len(ordered)} of {len(prompts)} prompts")
        return [Completion.from_choice(choice) for choice in ordered]

    async def _verdicts(self, rows: list[dict[str, str]], scoring: str | None = None,
                        threshold: float | None = None) -> list[tuple[Verdict, int]]:
        """``(verdict, prompt tokens)`` of each row (``text``, optional ``response``), in order; by
        ``scoring`` (default: the configured one): ``one_pass`` (:meth:`_one_pass`) or ``decode``, at
        ``threshold`` (default: the configured one; one-pass continues an answer to read its code at or
        above it, so a caller's lower threshold still gets the category)."""
        prompts = []
        for i, row in enumerate(rows):
            ids = prompt_token_ids(self.tokenizer, self.prompt(row), self.config.chat_template_kwargs)
            if self.context and len(ids) + self.config.max_tokens > self.context:
                where = "input" if len(rows) == 1 else f"input[{i}]"
                raise ApiError(413, "context_length_exceeded", f"`{where}`: the guard prompt is {len(ids)} tokens; "
                               f"with {self.config.max_tokens} answer tokens it exceeds the context of "
                               f"{self.context} tokens (texts are not truncated)", where)
            prompts.append(ids)
        scoring = scoring or self.config.scoring
        if scoring not in ("one_pass", "decode"):
            raise ApiError(400, "invalid_request_error", f"scoring {scoring!r} is neither one_pass nor decode")
        score = self._one_pass if scoring == "one_pass" else self._decode
        limit = self.config.threshold if threshold is None else threshold

        async def verdict(i: int, ids: list[int]) -> Verdict:
            try:
                return await score(ids, limit)
            except GuardAnswerError as exc:
                raise ApiError(502, "guard_answer_unparseable", f"text {i}: {exc}") from None

        try:
            verdicts = await asyncio.gather(*(verdict(i, ids) for i, ids in enumerate(prompts)))
        except ApiError:
            raise
        except Exception as exc:  # an engine replica that died or is not up yet
            log.warning("engine call failed: %s", type(exc).__name__)
            self._not_ready()
            raise ApiError(503, "engine_unavailable", f"the guard engine is unavailable: {type(exc).__name__}",
                           headers={"Retry-After": str(self.config.ingress.retry_after_s)}) from None
        return list(zip(verdicts, map(len, prompts)))

    async def _decode(self, ids: list[int], threshold: float) -> Verdict:
        """Today's path (``scoring: decode``): the whole answer, then :func:`read_verdict`."""
        return read_verdict(await self._complete(ids), self.answer_tokens, self.codes, threshold)

    async def _one_pass(self, ids: list[int], threshold: float) -> Verdict:
        """The verdict from the first answer token (:func:`one_pass_verdict`); an answer that must go on is
        continued from the prompt + its first token (the prefix cache holds the prompt) and read whole."""
        first = await self._first_tokens(ids)
        verdict = one_pass_verdict(first, self.answer_tokens, self.codes, threshold)
        if verdict is not None:
            return verdict
        regex = continuation_pattern(self.answers, first.text) if self.structured else None
        if (self.structured and regex is None) or len(first.token_ids) != 1:
            # a constrained first token that no well-formed answer goes on from, or no token id to continue
            # from: decode the whole answer
            return await self._decode(ids, threshold)
        rest = await self._continuations((ids + first.token_ids, regex))
        return read_verdict(first.joined(rest), self.answer_tokens, self.codes, threshold)

    # --- readiness -----------------------------------------------------------------------------
    def _start_warmup(self) -> None:
        """Run :meth:`_warm_up` once in the background, unless it runs or succeeded."""
        if self.ready or (self._warmup is not None and not self._warmup.done()):
            return
        try:
            self._warmup = asyncio.get_running_loop().create_task(self._warm_up())
        except RuntimeError:  # no event loop here: the first /readyz or health check starts it
            self._warmup = None

    async def _warm_up(self) -> None:
        """One guard request through the engine, by the configured scoring, retried until it is answered:
        after it the engine has loaded, compiled its first steps and the answer grammar, and the guard
        prompt's shared prefix is in vLLM's prefix cache. Then :attr:`ready`."""
        started, attempt = time.perf_counter(), 0
        while True:
            attempt += 1
            try:
                ((verdict, _),) = await self._verdicts([{"text": WARMUP_TEXT}])
            except ApiError as exc:
                self.warmup_error = f"{exc.kind}: {exc.message}"
                if exc.status != 503:  # an engine that answers, but not with a verdict: not ready, say why
                    log.error("guard warm-up failed: %s", self.warmup_error)
                    return
                await asyncio.sleep(min(5.0, 0.5 * attempt))
                continue
            self.ready, self.warmup_error = True, None
            log.info("guard ready: warm-up answered %s after %.1f s (%d attempt(s))", verdict.label,
                     time.perf_counter() - started, attempt)
            return

    def _not_ready(self) -> None:
        """The engine failed a request: not ready until a new warm-up is answered."""
        if self.ready:
            self.ready = False
            self._start_warmup()

    async def check_health(self) -> None:
        """Ray Serve's replica health check: the ingress is alive; it (re)starts the warm-up that
        readiness waits for. An engine that is down is Serve's check of the ``LLMServer`` replica."""
        self._start_warmup()

    def _policy(self, body: dict[str, Any]) -> Policy | None:
        """The request's ``policy`` (micro codes), or None; a bad one is a 400 naming the entry."""
        try:
            return parse_policy(body.get("policy"), self.taxonomy)
        except PolicyError as exc:
            raise ApiError(400, "invalid_request_error", exc.message, exc.param) from None

    # --- cross-cutting: overload, auth, metrics --------------------------------------------------
    async def _guarded(self, request: Request, route: str, handler) -> JSONResponse:
        start = time.perf_counter()
        if self._ongoing >= self.config.ingress.max_ongoing_requests:
            response = error_response(503, "overloaded", f"the guard is at its limit of "
                                      f"{self.config.ingress.max_ongoing_requests} ongoing requests per replica; "
                                      "retry later", headers={"Retry-After": str(self.config.ingress.retry_after_s)})
            self.metrics.request(route, 503, time.perf_counter() - start)
            return response
        self._ongoing += 1
        try:
            self._authorize(request)
            response = JSONResponse(await handler(await _json_body(request), start))
        except ApiError as exc:
            response = error_response(exc.status, exc.kind, exc.message, exc.param, exc.headers)
        finally:
            self._ongoing -= 1
        self.metrics.request(route, response.status_code, time.perf_counter() - start)
        return response

    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self._key.encode()):
            raise ApiError(401, "invalid_api_key", "missing or wrong bearer token (Authorization: Bearer <key>)")

    # --- routes --------------------------------------------------------------------------------
    @api.post("/v1/moderations")
    async def moderations(self, request: Request) -> JSONResponse:
        return await self._guarded(request, "moderations", self._moderations)

    async def _moderations(self, body: dict[str, Any], start: float) -> dict[str, Any]:
        if "input" not in body:
            raise ApiError(400, "invalid_request_error", "missing `input` (a string or a list of strings)", "input")
        texts = _texts(body["input"], "input", allow_list=True, max_inputs=self.config.max_inputs)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "invalid_request_error", f"`model` must be a string, got {type(model).__name__}",
                           "model")
        c = self.config
        scheme = select_categories(model, served_name=c.name, default=c.categories, openai_models=c.openai_models)
        openai = self.openai_mapping if scheme == OPENAI else None
        policy = self._policy(body)  # a chillguard extension (OpenAI's client: extra_body={"policy": [...]})
        verdicts = [apply_policy(v, policy) for v, _ in await self._verdicts([{"text": text} for text in texts])]
        self.metrics.verdicts(verdicts)
        return {"id": f"modr-{uuid.uuid4().hex}", "model": model or c.name,
                **({"policy": list(policy)} if policy is not None else {}),
                "results": [{**moderation_result(v, self.taxonomy, openai), **moderation_policy_fields(v, policy)}
                            for v in verdicts]}

    @api.post("/v1/guard")
    async def guard(self, request: Request) -> JSONResponse:
        return await self._guarded(request, "guard", self._guard)

    async def _guard(self, body: dict[str, Any], start: float) -> dict[str, Any]:
        unknown = sorted(set(body) - {"prompt", "response", "policy"})
        if unknown:
            raise ApiError(400, "invalid_request_error", f"unknown field(s) {', '.join(unknown)} (prompt, response, "
                           "policy)", unknown[0])
        if "prompt" not in body:
            raise ApiError(400, "invalid_request_error", "missing `prompt`", "prompt")
        prompt = _texts(body["prompt"], "prompt", allow_list=False, max_inputs=1)[0]
        response = body.get("response")
        if response is not None:
            response = _texts(response, "response", allow_list=False, max_inputs=1)[0]
        policy = self._policy(body)
        ((verdict, tokens),) = await self._verdicts([{"text": prompt, "response": response or ""}])
        verdict = apply_policy(verdict, policy)
        self.metrics.verdicts([verdict])
        return {**guard_result(verdict, self.taxonomy, level="response" if response else "prompt",
                               prompt_tokens=tokens, threshold=self.config.threshold, model=self.config.name,
                               latency_ms=1000 * (time.perf_counter() - start)),
                **guard_policy_fields(verdict, policy)}

    # --- streaming: /v1/moderations/stream and the guarded /v1/chat/completions (pipelines.serve.stream_routes) --
    @api.post("/v1/moderations/stream")
    async def moderations_stream(self, request: Request) -> Response:
        return await self._streamed(request, "moderations_stream",
                                    lambda: stream_routes.moderations_stream(self, request))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._streamed(request, "chat_completions",
                                    lambda: self._with_body(request, stream_routes.chat_completions))

    async def _with_body(self, request: Request, handler) -> Response:
        return await handler(self, request, await _json_body(request))

    async def _streamed(self, request: Request, route: str, handler) -> Response:
        """As :meth:`_guarded` for a streamed answer: a stream counts as ongoing until its last event."""
        start = time.perf_counter()
        if self._ongoing >= self.config.ingress.max_ongoing_requests:
            self.metrics.request(route, 503, time.perf_counter() - start)
            return error_response(503, "overloaded", f"the guard is at its limit of "
                                  f"{self.config.ingress.max_ongoing_requests} ongoing requests per replica; "
                                  "retry later", headers={"Retry-After": str(self.config.ingress.retry_after_s)})
        self._ongoing += 1
        try:
            self._authorize(request)
            response = await handler()
        except ApiError as exc:
            response = error_response(exc.status, exc.kind, exc.message, exc.param, exc.headers)
        except StreamRequestError as exc:
            response = error_response(400, "invalid_request_error", exc.message, exc.param)
        if not isinstance(response, StreamingResponse):
            self._ongoing -= 1
            self.metrics.request(route, response.status_code, time.perf_counter() - start)
            return response
        events = response.body_iterator

        async def counted():
            try:
                async for event in events:
                    yield event
            finally:
                self._ongoing -= 1
                self.metrics.request(route, response.status_code, time.perf_counter() - start)
        response.body_iterator = counted()
        return response

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness: the ingress answers (200 while the engine still loads; readiness is /readyz)."""
        return {"status": "ok", "model": self.config.name, "threshold": self.config.threshold,
                "auth": self._key is not None, "max_batch_size": self.config.max_batch_size,
                "context": self.context, "scoring": self.config.scoring, "ready": self.ready}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 once a warm-up guard request went through the engine (a request is then answered
        at normal speed), 503 with ``Retry-After`` before (and after an engine failure, until a new warm-up
        is answered)."""
        self._start_warmup()
        if self.ready:
            return JSONResponse({"status": "ready", "model": self.config.name})
        return JSONResponse({"status": "warming_up" if self.warmup_error is None or "unavailable" in
                             self.warmup_error else "failed", "model": self.config.name,
                             "error": self.warmup_error}, status_code=503,
                            headers={"Retry-After": str(self.config.ingress.retry_after_s)})

    @api.get("/", response_class=HTMLResponse)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(self._page.replace("{{MODEL}}", self.config.name)
                            .replace("{{HOLD_BACK}}", str(self.config.stream.hold_back_tokens)))


def _model_context(model: str) -> int | None:
    """The context of ``model`` from its config (``max_position_embeddings``) when the engine
    arguments set no ``max_model_len``."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
