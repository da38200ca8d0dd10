"""Streaming moderation through the guarded proxy: leaks, detection delay, added latency, throughput.

    python benchmarks/stream_guard.py [--model DIR | --run RUN_DIR [--stage S]] [--data FILE | --rows STAGE]
                                      [--token-rate 20] [--concurrency 1 8]

On an embedded local Ray, the product's app (:func:`pipelines.serve.app.build_app`) serves the guard with
its guarded ``/v1/chat/completions`` in front of an upstream started in this process: a small real
OpenAI-compatible server (Starlette + uvicorn) that streams each row's response one token (the guard's
tokenizer) every ``1 / --token-rate`` seconds, the way a model generates it. Without ``--model`` the
offline tiny model is the guard (random weights, answers constrained to the guard format): its quality
figures are then meaningless (it flags by chance, not by content) and the run checks the flow and the
latency only. ``--model`` takes a real guard (or a base model as a zero-shot guard; add
``--set constrained=true`` for a model not trained on the guard format). ``--run`` serves the guard a run
trained, as ``chillguard serve RUN_DIR`` does (its prompt, chat template and evaluated threshold).

The labelled set (``--data``, JSONL; default ``configs/data/stream_guard_responses.jsonl``, written for
this repo) holds response-level rows ``{prompt, response, label, unsafe_from}``: ``unsafe_from`` is the
character where the first unsafe sentence of an unsafe response starts (a safe lead-in precedes it).
``--rows STAGE`` reads the labelled rows of a stage of ``--run`` instead (``text`` as the prompt, ``response``,
``label``; e.g. ``configs/recipes/stream_guard_real.yaml``'s ToxiCN posts read as answers): labels per text
have no ``unsafe_from``, so every token of an unsafe response counts as unsafe (its first sentence is the
first unsafe one). ``--lead-in`` puts a safe row's response before each unsafe one (cycling through the safe
rows), so that the guard must pass a safe start and stop the stream once the unsafe text begins: the case the
hold-back window is for.
Each row is streamed once through the proxy (``openai``-style SSE, aiohttp) and once straight from the
upstream (the unguarded baseline). Figures:

- **leak** (unsafe rows): tokens of the unsafe part (from ``unsafe_from``) that reached the caller. Target 0.
  A stream the guard never blocks leaks all of it (counted as missed, and in the leak).
- **detection delay** (unsafe rows blocked once their unsafe part began): tokens the guard had read when it
  blocked, minus the tokens up to the end of the first unsafe sentence (negative: blocked before that sentence
  ended). A block while the guard had read only the safe lead-in is counted apart (``blocked_before_unsafe``):
  it kept the unsafe text back, but by flagging safe text.
- **false blocks** (safe rows).
- **latency**: time to the first content token at the caller, and per token the time from the upstream's
  emission of that token to its arrival at the caller (mean, p50, p95), guarded minus unguarded.
- **throughput**: ``c`` concurrent guarded streams of the whole set: tokens released per second, and
  whether the streams kept up with the token rate (the per-token delay at that concurrency).
- **prefix cache**: vLLM's ``prefix_cache_hits`` / ``prefix_cache_queries`` counters (Ray's Prometheus
  export of the engine's metrics) over the guarded runs: the share of prompt tokens served from the cache.

Writes JSON (default ``bench_out/stream_guard.json``); figures it could not measure print ``n/a`` with why.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.report import add_output_args, finish, fresh_dir
from cluster.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
SENTENCE_END = re.compile(r"[。！？!?]|[.](?=\s|$)")


def load_rows(path: str) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if row.get("label") not in ("safe", "unsafe") or not row.get("response") or not row.get("prompt"):
            raise SystemExit(f"{path}: row {i + 1} needs prompt, response and label safe|unsafe")
        if row["label"] == "unsafe" and not isinstance(row.get("unsafe_from"), int):
            raise SystemExit(f"{path}: unsafe row {i + 1} needs unsafe_from (the first unsafe character)")
    return rows


def stage_rows(run_dir: str, stage: str) -> list[dict]:
    """The ok rows of ``stage`` in run ``run_dir`` as benchmark rows; an unsafe one is unsafe from its start."""
    from pipelines.core.rows import OK, column_or_lineage
    from pipelines.core.rundir import NotARunDir, RunDir

    rundir = RunDir(run_dir, create=False)
    try:
        rundir.check_is_run_dir()
    except NotARunDir as exc:
        raise SystemExit(str(exc)) from None
    if rundir.read_manifest(stage) is None:
        raise SystemExit(f"{run_dir}: no finished stage {stage!r} (finished: {', '.join(rundir.manifests())})")
    schema = rundir.output_schema(stage)
    if schema is None:
        raise SystemExit(f"{run_dir}: stage {stage!r} wrote no rows")
    columns = [c for c in ("id", "text", "response", "label", "lineage") if c in schema.names]
    rows = []
    for batch in rundir.iter_batches(stage, OK, columns):
        for r in batch.to_pylist():
            response = column_or_lineage(r, "response") or ""
            if r.get("label") in ("safe", "unsafe") and response.strip():
                rows.append({"id": r["id"], "prompt": r["text"], "response": response, "label": r["label"],
                             **({"unsafe_from": 0} if r["label"] == "unsafe" else {})})
    if not rows:
        raise SystemExit(f"{run_dir}: stage {stage!r} has no labelled rows with a response")
    return sorted(rows, key=lambda r: r["id"])


def with_lead_ins(rows: list[dict], separator: str = "\n") -> list[dict]:
    """Each unsafe row's response preceded by a safe row's (the safe rows in turn), ``unsafe_from`` moved past
    the lead-in; safe rows unchanged. Without safe rows there is nothing to lead in with."""
    safe = [r for r in rows if r["label"] == "safe"]
    if not safe:
        raise SystemExit("--lead-in needs safe rows to lead in with")
    lead = itertools.cycle(safe)
    out = []
    for row in rows:
        if row["label"] == "unsafe":
            head = next(lead)["response"] + separator
            row = {**row, "response": head + row["response"], "unsafe_from": len(head) + row["unsafe_from"]}
        out.append(row)
    return out


def token_pieces(tokenizer, text: str) -> list[str]:
    """``text`` cut at its tokens' starts (the guard's tokenizer): the upstream streams one piece per token."""
    from pipelines.serve.stream import token_starts

    starts = sorted(set(token_starts(tokenizer, text))) + [len(text)]
    return [text[a:b] for a, b in itertools.pairwise(starts) if b > a]


class Upstream:
    """The scripted OpenAI-compatible model: streams ``answers[user]`` at ``rate`` pieces/s and records when
    each piece left (``emitted[stream id]``: list of (char offset after the piece, time))."""

    def __init__(self, answers: dict[str, list[str]], rate: float):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        self.answers, self.rate, self.emitted = answers, rate, {}

        async def chat(request):
            body = await request.json()
            pieces, sid = self.answers[body["user"]], body["user"] + "#" + body.get("metadata", {}).get("run", "")
            marks = self.emitted.setdefault(sid, [])

            async def events():
                base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                        "model": body["model"]}
                offset, start = 0, time.perf_counter()
                for i, piece in enumerate(pieces):
                    await asyncio.sleep(max(0.0, start + i / self.rate - time.perf_counter()))
                    offset += len(piece)
                    marks.append((offset, time.perf_counter()))
                    yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {'content': piece}}]})}\n\n"
                end = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                yield f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/chat/completions", chat,
                                                                           methods=["POST"])]),
                                                    host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"


async def one_stream(session, url: str, row: dict, run: str) -> dict:
    """One chat stream: ``[(char offset after the chunk, arrival time)]``, the finish reason, the moderation."""
    body = {"model": "upstream", "stream": True, "user": row["id"], "metadata": {"run": run},
            "messages": [{"role": "user", "content": row["prompt"]}]}
    arrivals, text, finish_reason, moderation = [], "", None, None
    start = time.perf_counter()
    async with session.post(url + "/chat/completions", json=body) as answer:
        assert answer.status == 200, await answer.text()
        async for raw in answer.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    text += content
                    arrivals.append((len(text), time.perf_counter()))
                finish_reason = choice.get("finish_reason") or finish_reason
            moderation = chunk.get("guard") or moderation
    return {"id": row["id"], "run": run, "start": start, "text": text, "arrivals": arrivals,
            "finish_reason": finish_reason, "moderation": moderation}


def token_delays(stream: dict, emitted: list[tuple[int, float]]) -> list[float]:
    """Per released token: its arrival at the caller minus the upstream's emission of it (seconds)."""
    delays, i = [], 0
    for offset, emitted_at in emitted:
        if offset > len(stream["text"]):
            break
        while stream["arrivals"][i][0] < offset:
            i += 1
        delays.append(stream["arrivals"][i][1] - emitted_at)
    return delays


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


async def run_set(url: str, rows: list[dict], run: str, concurrency: int) -> list[dict]:
    import aiohttp

    queue, out = list(rows), []

    async def worker(session):
        while queue:
            out.append(await one_stream(session, url, queue.pop(0), run))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return out


def prefix_counters() -> tuple[float, float] | None:
    """``(hits, queries)`` of vLLM's prefix cache on this Ray node's Prometheus export once it settled, or None."""
    from cluster.prometheus import node_metrics_url, prefix_cache_counters, scrape, settled

    url = node_metrics_url()
    return settled(lambda: prefix_cache_counters(scrape(url)))


def quality(rows: list[dict], streams: dict[str, dict], tokenizer) -> dict:
    from pipelines.serve.stream import token_starts

    unsafe = [r for r in rows if r["label"] == "unsafe"]
    safe = [r for r in rows if r["label"] == "safe"]
    leaked = unsafe_total = leaked_blocked = 0
    leaking, missed, early, delays = [], [], [], []
    for row in unsafe:
        s, text = streams[row["id"]], row["response"]
        starts = token_starts(tokenizer, text)
        unsafe_start = bisect.bisect_left(starts, row["unsafe_from"])  # tokens before the unsafe part
        unsafe_total += len(starts) - unsafe_start
        leak = max(0, bisect.bisect_left(starts, len(s["text"])) - unsafe_start)
        leaked += leak
        if leak:
            leaking.append(row["id"])
        if s["finish_reason"] != "content_filter":
            missed.append(row["id"])
            continue
        leaked_blocked += leak  # released before a late block: a judged-safe prefix past the window
        if s["moderation"]["judged_tokens"] <= unsafe_start:  # flagged the safe lead-in: no detection
            early.append(row["id"])
            continue
        end = SENTENCE_END.search(text, row["unsafe_from"])
        sentence_end = bisect.bisect_left(starts, end.end() if end else len(text))
        delays.append(s["moderation"]["judged_tokens"] - sentence_end)
    false_blocks = [r["id"] for r in safe if streams[r["id"]]["finish_reason"] == "content_filter"]
    return {"unsafe_rows": len(unsafe), "safe_rows": len(safe), "unsafe_tokens": unsafe_total,
            "leaked_tokens": leaked, "leak_rate": leaked / unsafe_total if unsafe_total else None,
            "leaked_tokens_missed": leaked - leaked_blocked, "leaked_tokens_blocked": leaked_blocked,
            "streams_leaking": leaking, "missed": missed, "false_blocks": false_blocks, "blocked_before_unsafe": early,
            "detection_delay_tokens": {"values": delays, "mean": statistics.mean(delays) if delays else None,
                                       "max": max(delays) if delays else None}}


def latency(streams: list[dict], upstream: Upstream) -> dict:
    ttft = [s["arrivals"][0][1] - s["start"] for s in streams if s["arrivals"]]
    delays = [d for s in streams for d in token_delays(s, upstream.emitted[s["id"] + "#" + s["run"]])]
    return {"ttft_s_mean": statistics.mean(ttft) if ttft else None, "token_delay_s_mean":
            statistics.mean(delays) if delays else None, "token_delay_s_p50": percentile(delays, 50),
            "token_delay_s_p95": percentile(delays, 95), "tokens": len(delays)}


def fmt(value, unit="", scale=1.0, digits=3) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="guard model folder (default: build the tiny model)")
    parser.add_argument("--run", help="serve the guard this run trained (as chillguard serve RUN_DIR)")
    parser.add_argument("--stage", help="with --run: which guard-training stage (default: the last finished)")
    parser.add_argument("--rows", help="with --run: stream this stage's labelled rows instead of --data")
    parser.add_argument("--lead-in", action="store_true", help="a safe response before each unsafe one")
    parser.add_argument("--config", default=str(ROOT / "configs/serve/cpu.yaml"))
    parser.add_argument("--data", default=str(ROOT / "configs/data/stream_guard_responses.jsonl"))
    parser.add_argument("--token-rate", type=float, default=20, help="upstream tokens per second per stream")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--set", nargs="*", default=[], help="extra serve settings, key=value")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    add_output_args(parser, "stream_guard")
    args = parser.parse_args()

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from pipelines.serve.app import APP_NAME, ROUTE_PREFIX, build_app
    from pipelines.serve.cli import serve_settings
    from pipelines.training.tiny_models import build_tiny_models

    if args.run and args.model:
        raise SystemExit("give --model or --run, not both")
    if (args.rows or args.stage) and not args.run:
        raise SystemExit("--rows and --stage read a run: give --run RUN_DIR")
    rows = stage_rows(args.run, args.rows) if args.rows else load_rows(args.data)
    data = f"{args.run}:{args.rows}" if args.rows else args.data
    if args.lead_in:
        rows, data = with_lead_ins(rows), data + " (safe lead-ins)"
    if max(args.concurrency) > len(rows):
        raise SystemExit(f"--concurrency at most {len(rows)} (the rows of {data}: one stream each)")
    work = fresh_dir(args.workdir)
    tiny = args.model is None and args.run is None
    model = build_tiny_models(work / "models")["causal-lm"] if tiny else args.model
    overrides = ["ingress.max_ongoing_requests=256", *(["constrained=true", "max_tokens=4"] if tiny else []),
                 *args.set]
    config, _, what = serve_settings(argparse.Namespace(run_dir=args.run, overrides=overrides, model=model,
                                                        stage=args.stage, config=args.config, host=None,
                                                        port=None), cuda=False)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    upstream = Upstream({r["id"]: token_pieces(tokenizer, r["response"]) for r in rows}, args.token_rate)
    config = config.model_copy(update={"proxy": config.proxy.model_copy(
        update={"upstream_base_url": upstream.url})})
    print(f"guard: {what}; threshold {config.threshold}; {len(rows)} rows from {data}", flush=True)
    port = free_port()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=512 * 1024**2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
        print(f"app up in {time.perf_counter() - started:.1f} s; hold-back {config.stream.hold_back_tokens} tokens, "
              f"judge every {config.stream.judge_every_tokens}; upstream {args.token_rate:g} tokens/s", flush=True)
        guarded_url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(run_set(guarded_url, rows[:2], "warmup", 2))
        plain = {s["id"]: s for s in asyncio.run(run_set(upstream.url, rows, "plain", 1))}
        before = prefix_counters()
        guarded = {s["id"]: s for s in asyncio.run(run_set(guarded_url, rows, "guarded", 1))}
        after = prefix_counters()
        levels = {}
        for c in args.concurrency:
            t0 = time.perf_counter()
            streams = asyncio.run(run_set(guarded_url, rows, f"c{c}", c))
            wall = time.perf_counter() - t0
            released = sum(len(token_starts_of(tokenizer, s["text"])) for s in streams)
            levels[str(c)] = {"streams": len(streams), "wall_s": wall, "released_tokens_per_s": released / wall,
                              **latency(streams, upstream)}
        serve.shutdown()
    finally:
        ray.shutdown()
        upstream.server.should_exit = True

    q = quality(rows, guarded, tokenizer)
    lat_plain, lat_guarded = latency(list(plain.values()), upstream), latency(list(guarded.values()), upstream)
    added = {k: (lat_guarded[k] - lat_plain[k]) if lat_guarded[k] is not None and lat_plain[k] is not None
             else None for k in ("ttft_s_mean", "token_delay_s_mean", "token_delay_s_p50", "token_delay_s_p95")}
    cache = None
    if before and after and after[1] > before[1]:
        cache = {"hits": after[0] - before[0], "queries": after[1] - before[1],
                 "hit_rate": (after[0] - before[0]) / (after[1] - before[1])}
    note = ("tiny random-weight guard: which texts it flags is chance, so leak, delay and false blocks say "
            "nothing about quality; the latency and the mechanics are real") if tiny else None
    print(f"\n{len(rows)} rows ({q['unsafe_rows']} unsafe, {q['safe_rows']} safe), one stream each"
          + (f"\nNOTE: {note}" if note else ""))
    print(f"  leak: {q['leaked_tokens']} of {q['unsafe_tokens']} unsafe tokens released "
          f"({fmt(q['leak_rate'], '', 100, 1)} %: {q['leaked_tokens_missed']} by {len(q['missed'])} missed streams, "
          f"{q['leaked_tokens_blocked']} before a later block); false blocks {len(q['false_blocks'])} "
          f"of {q['safe_rows']}")
    delay = q["detection_delay_tokens"]
    print(f"  detection delay after the first unsafe sentence: mean {fmt(delay['mean'], ' tokens', 1, 1)}"
          + ("" if delay["mean"] is not None else " (no unsafe stream was blocked once its unsafe part began)")
          + f"; {len(q['blocked_before_unsafe'])} blocked on the safe lead-in, before the unsafe part began")
    print(f"  time to first token: unguarded {fmt(lat_plain['ttft_s_mean'], ' s')}, guarded "
          f"{fmt(lat_guarded['ttft_s_mean'], ' s')} (+{fmt(added['ttft_s_mean'], ' s')})")
    print("  per-token delay (upstream emission -> caller): unguarded mean "
          f"{fmt(lat_plain['token_delay_s_mean'], ' s')}, guarded mean "
          f"{fmt(lat_guarded['token_delay_s_mean'], ' s')} p95 "
          f"{fmt(lat_guarded['token_delay_s_p95'], ' s')} (+{fmt(added['token_delay_s_mean'], ' s')} mean)")
    print("  prefix cache over the guarded streams: " + (
        f"{cache['hit_rate']:.1%} of {cache['queries']:.0f} prompt tokens from the cache" if cache else
        "n/a (no vllm prefix_cache counters on the Prometheus export)"))
    for c, level in levels.items():
        print(f"  {c} concurrent guarded streams: {level['released_tokens_per_s']:.1f} tokens/s released; "
              f"per-token delay mean {fmt(level['token_delay_s_mean'], ' s')} "
              f"p95 {fmt(level['token_delay_s_p95'], ' s')}")
    finish({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "date": time.strftime("%Y-%m-%d"), "note": note,
            "settings": {"model": config.model, "run": args.run, "data": data, "token_rate": args.token_rate,
                         "hold_back_tokens": config.stream.hold_back_tokens,
                         "judge_every_tokens": config.stream.judge_every_tokens, "threshold": config.threshold,
                         "concurrency": args.concurrency, "set": args.set},
            "quality": q, "latency": {"unguarded": lat_plain, "guarded": lat_guarded, "added": added},
            "prefix_cache": cache, "concurrency": levels,
            "streams": {"guarded": {k: {kk: v[kk] for kk in ("text", "finish_reason", "moderation")}
                                    for k, v in guarded.items()}},
            "targets": {"leak rate 0": q["leaked_tokens"] == 0}}, args.out)


def token_starts_of(tokenizer, text: str) -> list[int]:
    from pipelines.serve.stream import token_starts

    return token_starts(tokenizer, text)


if __name__ == "__main__":
    main()
