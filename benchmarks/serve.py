"""The served guard under load: requests/s and latency at several concurrencies, one-pass scoring against
decoding the whole answer, with the prefix cache on and off, batched vs unbatched, against offline vLLM on
the same prompts.

    python benchmarks/serve.py [--model DIR] [--requests 256] [--concurrency 1 8 32] [--time-limit 60]
                               [--variants one_pass decode no_prefix_cache unbatched]

On an embedded local Ray, the product's app (:func:`pipelines.serve.app.build_app`: ``ray.serve.llm``
vLLM replica + our ingress, 127.0.0.1, a free port) serves the guard; without ``--model`` the offline
tiny model is built into ``--workdir`` (random weights, so answers are constrained to the guard format,
``constrained: true``). A bounded load generator (asyncio + aiohttp, one process) sends ``POST
/v1/moderations`` with one text per request from ``c`` concurrent callers until ``--requests`` are
answered or ``--time-limit`` passes; each text is distinct (the guard prompt's instructions and taxonomy
are a shared prefix, the text is not). Deployments of the same app, one after the other (each waits for
``/readyz``):

- ``one_pass``: the default settings (``scoring: one_pass``, prefix cache on, batches of up to 32 prompts
  per engine call, vLLM's default of up to 256 sequences per step): a 1-token completion decides, the
  answer is continued only when it goes on to a code;
- ``decode``: ``scoring: decode``, today's path until issue 32: every answer decoded whole (up to
  ``max_tokens``, 8) with its top log-probabilities;
- ``no_prefix_cache``: ``one_pass`` with ``enable_prefix_caching: false``;
- ``unbatched``: ``one_pass`` with ``max_batch_size: 1`` and the engine's ``max_num_seqs: 1``.

Each variant reports vLLM's prefix-cache hit rate over its timed levels (``vllm:prefix_cache_hits`` /
``vllm:prefix_cache_queries``, in prompt tokens, from Ray's Prometheus export of the engine's metrics)
and, for one-pass variants, the share of texts that needed a continuation (our batch-size histogram's
``continuation`` / ``first_token`` prompts).

Offline ceilings, after Serve is shut down, alone on the machine: ``vllm.LLM.generate`` on the same
prompts, as token ids rendered the way the ingress renders them, greedy, the served config's top
log-probabilities and answer regex: (1) the one-pass call, ``max_tokens=1``; (2) the whole answer,
``max_tokens=8``; and (3) vLLM's classification conversion of the same model (``convert="classify"``, a
``from_2_way_softmax`` head built from the lm_head rows of the first tokens of ``safe`` and ``unsafe``:
``LLM.classify``), prompts/s of one call after a warm-up call. A ceiling that cannot run prints ``n/a``
with the error.

Each level is warmed up with ``c`` requests first (not timed). A level that did not finish its
requests inside the time limit reports the rate of what it did finish, marked ``partial``; a level
with fewer than 20 answers prints ``n/a`` (too few to time). Targets (one run): one-pass at
concurrency 32 >= 1.5x decode at 32 (issue 32); batched (one-pass) >= 3x unbatched at 32, and >= 0.6x
its offline ceiling (the 1-token call). Writes JSON (default ``bench_out/serve.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.report import add_output_args, finish, fresh_dir
from cluster.processes import free_port
from cluster.prometheus import metric_sum, prefix_cache_counters, scrape, settled

MIN_ANSWERS = 20
TARGET_BATCHING, TARGET_CEILING, TARGET_ONE_PASS = 3.0, 0.6, 1.5
ANSWER_TOKENS = 8  # the served default max_tokens: what `decode` generates at most
#: name -> overrides of the served settings (on top of the benchmark's own)
VARIANTS = {
    "one_pass": ["scoring=one_pass"],
    "decode": ["scoring=decode"],
    "no_prefix_cache": ["scoring=one_pass", "engine.engine_kwargs.enable_prefix_caching=false"],
    "unbatched": ["scoring=one_pass", "max_batch_size=1", "engine.engine_kwargs.max_num_seqs=1"],
}
WORDS = ["请问", "如何", "制作", "一个", "网站", "today", "weather", "market", "安全", "攻击", "银行", "password",
         "story", "医院", "学校", "travel", "recipe", "法律", "投资", "game", "music", "朋友", "工作", "history",
         "science"]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for i in range(n)]


async def load(url: str, prompts: list[str], concurrency: int, time_limit: float) -> dict:
    """``concurrency`` callers (aiohttp, one keep-alive session) take texts from one queue until it
    is empty or time is up."""
    import aiohttp

    latencies: list[float] = []
    failures: dict[int, int] = {}
    queue = list(reversed(prompts))
    deadline = time.perf_counter() + time_limit

    async def caller(session: aiohttp.ClientSession) -> None:
        while queue and time.perf_counter() < deadline:
            text = queue.pop()
            start = time.perf_counter()
            async with session.post(url, json={"input": text}) as answer:
                await answer.read()
                if answer.status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures[answer.status] = failures.get(answer.status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(caller(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"answered": len(latencies), "failed": failures, "wall_s": wall, "latencies": latencies,
            "partial": bool(queue)}


def summarize(run: dict) -> dict:
    import numpy as np

    out = {k: run[k] for k in ("answered", "failed", "wall_s", "partial")}
    if run["answered"] < MIN_ANSWERS:
        out.update(rps=None, p50_ms=None, p99_ms=None, why_na=f"{run['answered']} answers (< {MIN_ANSWERS})")
        return out
    lat = np.asarray(run["latencies"]) * 1000
    out.update(rps=run["answered"] / run["wall_s"], p50_ms=float(np.percentile(lat, 50)),
               p99_ms=float(np.percentile(lat, 99)))
    return out


COUNTERS = {"first_token_prompts": ("ray_chillguard_serve_batch_size_sum", {"call": "first_token"}),
            "continuation_prompts": ("ray_chillguard_serve_batch_size_sum", {"call": "continuation"}),
            "decode_prompts": ("ray_chillguard_serve_batch_size_sum", {"call": "decode"})}


def settled_counters(port: int) -> dict[str, float]:
    """The counters once Ray's export shows the same values twice (:func:`cluster.prometheus.settled`)."""
    def read() -> dict[str, float]:
        text = scrape(f"http://127.0.0.1:{port}/metrics")
        hits, queries = prefix_cache_counters(text) or (0.0, 0.0)
        return {**{key: metric_sum(text, name, **labels) for key, (name, labels) in COUNTERS.items()},
                "prefix_hits": hits, "prefix_queries": queries}

    return settled(read)


def serve_variant(model: str, port: int, metrics_port: int, name: str, args) -> dict:
    from ray import serve

    from pipelines.serve.app import APP_NAME, ROUTE_PREFIX, build_app
    from pipelines.serve.cli import serve_settings, wait_until_ready

    overrides = [f"model={model}", "constrained=true", f"max_tokens={ANSWER_TOKENS}",
                 "ingress.max_ongoing_requests=256", *VARIANTS[name]]
    config, _, _ = serve_settings(argparse.Namespace(run_dir=None, overrides=overrides, model=None, stage=None,
                                                     config=args.config, host=None, port=None), cuda=False)
    started = time.perf_counter()
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
    base = f"http://127.0.0.1:{port}"
    ready = wait_until_ready(base, time.monotonic(), every_s=0.5, timeout_s=600)
    print(f"\n{name}: app up in {time.perf_counter() - started:.1f} s (ready {ready:.1f} s after serve.run "
          "returned)", flush=True)
    url = f"{base}/v1/moderations"
    levels = {}
    counted = {}
    for level, c in enumerate(args.concurrency):
        asyncio.run(load(url, texts(c, args.seed + 1000 + level), c, args.time_limit))  # warm-up
        before = settled_counters(metrics_port)
        run = summarize(asyncio.run(load(url, texts(args.requests, args.seed + level), c, args.time_limit)))
        after = settled_counters(metrics_port)
        counted[c] = {key: after[key] - before[key] for key in after}
        run.update(engine_counters(counted[c]))
        levels[c] = run
        rate = "n/a" if run["rps"] is None else f"{run['rps']:.1f}"
        lat = "" if run["rps"] is None else f"  p50 {run['p50_ms']:.0f} ms  p99 {run['p99_ms']:.0f} ms"
        hit = "n/a" if run["prefix_hit_rate"] is None else f"{100 * run['prefix_hit_rate']:.0f}%"
        went_on = ("" if run["continued_share"] is None
                   else f"  continued {100 * run['continued_share']:.0f}% of texts")
        print(f"  concurrency {c:>3}: {run['answered']} answered in {run['wall_s']:.1f} s -> {rate} req/s{lat}"
              f"  prefix-cache hits {hit}{went_on}"
              f"{'  (partial: time limit)' if run['partial'] else ''}"
              f"{'  failed ' + str(run['failed']) if run['failed'] else ''}",
              flush=True)
    serve.delete(APP_NAME)
    return {"overrides": VARIANTS[name], "levels": levels}


def engine_counters(delta: dict[str, float]) -> dict:
    """Prefix-cache hit rate (cached / queried prompt tokens) and the share of one-pass texts continued."""
    hit = delta["prefix_hits"] / delta["prefix_queries"] if delta["prefix_queries"] > 0 else None
    first = delta["first_token_prompts"]
    return {"prefix_hit_rate": hit, "continued_share": delta["continuation_prompts"] / first if first else None,
            "counters": delta}


def offline_prompts(model: str, args) -> list[list[int]]:
    from transformers import AutoTokenizer

    from pipelines.core.config import CONFIGS
    from pipelines.core.prompts import prompt_token_ids
    from pipelines.core.taxonomy import load_taxonomy
    from pipelines.guard.format import GuardPrompt

    prompt = GuardPrompt(load_taxonomy(CONFIGS / "taxonomy.yaml"))
    tok = AutoTokenizer.from_pretrained(model)
    return [prompt_token_ids(tok, prompt({"text": t}), {}) for t in texts(args.requests, args.seed)]


ENGINE = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True, "kv_cache_memory_bytes": 256 * 1024**2,
          "seed": 0}


def timed(call, ids: list[list[int]]) -> dict:
    call([{"prompt_token_ids": i} for i in ids[:32]])  # warm-up
    start = time.perf_counter()
    outputs = call([{"prompt_token_ids": i} for i in ids])
    wall = time.perf_counter() - start
    assert len(outputs) == len(ids)
    return {"prompts": len(ids), "wall_s": wall, "rps": len(ids) / wall,
            "prompt_tokens_mean": sum(map(len, ids)) / len(ids)}


def offline_generate(model: str, ids: list[list[int]]) -> dict[str, dict]:
    """Prompts/s of ``vllm.LLM.generate`` on the benchmark's prompts: the one-pass call (1 token) and the
    whole answer (``ANSWER_TOKENS``), the served config's top log-probabilities and answer regex."""
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from pipelines.core.config import CONFIGS
    from pipelines.core.taxonomy import load_taxonomy
    from pipelines.guard.adapters import ChillGuardAdapter
    from pipelines.serve.config import GuardServeConfig

    pattern = ChillGuardAdapter(load_taxonomy(CONFIGS / "taxonomy.yaml"),
                                CONFIGS / "prompts" / "guard.yaml").answer_pattern("prompt")
    top_logprobs = GuardServeConfig.model_fields["top_logprobs"].default  # what the served ingress asks for
    llm = LLM(model=model, **ENGINE)
    out = {}
    for name, tokens in (("one_pass", 1), ("decode", ANSWER_TOKENS)):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=top_logprobs,
                                structured_outputs=StructuredOutputsParams(regex=pattern))
        out[name] = timed(lambda prompts, p=params: llm.generate(prompts, p, use_tqdm=False), ids)
    llm.llm_engine.engine_core.shutdown()  # its engine-core process: the next engine has the machine
    return out


def offline_classify(model: str, ids: list[list[int]]) -> dict:
    """Prompts/s of vLLM's classification conversion of the guard (``from_2_way_softmax`` over the first
    tokens of ``safe`` and ``unsafe``), or ``n/a`` with the error."""
    from transformers import AutoTokenizer
    from vllm import LLM

    tok = AutoTokenizer.from_pretrained(model)
    first = [tok.decode(tok.encode(word, add_special_tokens=False)[:1]) for word in ("safe", "unsafe")]
    try:
        llm = LLM(model=model, runner="pooling", convert="classify",
                  hf_overrides={"classifier_from_token": first, "method": "from_2_way_softmax"}, **ENGINE)
        result = timed(lambda prompts: llm.classify(prompts, use_tqdm=False), ids)
    except Exception as exc:  # report what vLLM said, as n/a
        return {"rps": None, "why_na": f"{type(exc).__name__}: {str(exc)[:300]}", "tokens": first}
    llm.llm_engine.engine_core.shutdown()
    return {**result, "tokens": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="guard model folder (default: build the tiny model)")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/serve/cpu.yaml"))
    parser.add_argument("--requests", type=int, default=256, help="answered requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--time-limit", type=float, default=60, help="seconds per level")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline ceilings")
    add_output_args(parser, "serve")
    args = parser.parse_args()

    work = fresh_dir(args.workdir)
    model = args.model or __import__("pipelines.training.tiny_models", fromlist=["x"]).build_tiny_models(
        work / "models")["causal-lm"]
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=512 * 1024**2)
    try:
        metrics_port = ray._private.worker._global_node.metrics_export_port
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        variants = {name: serve_variant(model, port, metrics_port, name, args) for name in args.variants}
        serve.shutdown()
    finally:
        ray.shutdown()
    offline: dict[str, dict] = {}
    if not args.no_offline:
        ids = offline_prompts(model, args)
        offline = {**offline_generate(model, ids), "classify": offline_classify(model, ids)}
        print(f"\noffline vLLM ({len(ids)} prompts, {offline['one_pass']['prompt_tokens_mean']:.0f} tokens mean):")
        for name, what in (("one_pass", "LLM.generate, 1 token + top log-probabilities"),
                           ("decode", f"LLM.generate, up to {ANSWER_TOKENS} tokens"),
                           ("classify", "LLM.classify, from_2_way_softmax conversion")):
            got = offline[name]
            rate = f"{got['rps']:.1f} prompts/s" if got.get("rps") else f"n/a ({got.get('why_na')})"
            print(f"  {what}: {rate}")

    top = max(args.concurrency)

    def rps(variant: str) -> float | None:
        return (variants.get(variant) or {}).get("levels", {}).get(top, {}).get("rps")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def at_least(x: float | None, target: float) -> bool | None:
        return None if x is None else x >= target  # None: a variant it needs did not run

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    ratios = {"one_pass_over_decode": ratio(rps("one_pass"), rps("decode")),
              "prefix_cache_on_over_off": ratio(rps("one_pass"), rps("no_prefix_cache")),
              "batched_over_unbatched": ratio(rps("one_pass"), rps("unbatched")),
              "one_pass_over_offline_one_pass": ratio(rps("one_pass"), (offline.get("one_pass") or {}).get("rps")),
              "offline_classify_over_offline_one_pass": ratio((offline.get("classify") or {}).get("rps"),
                                                              (offline.get("one_pass") or {}).get("rps"))}
    print(f"\nconcurrency {top}: " + "; ".join(f"{k.replace('_', ' ')} = {fmt(v)}" for k, v in ratios.items()))
    finish({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "date": datetime.date.today().isoformat(),
            "settings": {"requests": args.requests, "concurrency": args.concurrency, "time_limit_s": args.time_limit,
                         "model": model, "config": args.config, "answer_tokens": ANSWER_TOKENS},
            "variants": {name: {**v, "levels": {str(c): r for c, r in v["levels"].items()}}
                         for name, v in variants.items()},
            "offline": offline, **ratios,
            "targets": {f"one-pass >= {TARGET_ONE_PASS}x decode at concurrency {top}":
                        at_least(ratios["one_pass_over_decode"], TARGET_ONE_PASS),
                        f"batched >= {TARGET_BATCHING}x unbatched at concurrency {top}":
                        at_least(ratios["batched_over_unbatched"], TARGET_BATCHING),
                        f"batched >= {TARGET_CEILING}x its offline ceiling (1-token LLM.generate)":
                        at_least(ratios["one_pass_over_offline_one_pass"], TARGET_CEILING)}},
           args.out)


if __name__ == "__main__":
    main()
