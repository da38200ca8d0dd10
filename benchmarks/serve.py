"""The served guard under load: requests/s and latency at several concurrencies, batched vs unbatched,
against offline vLLM on the same prompts.

    python benchmarks/serve.py [--model DIR] [--requests 256] [--concurrency 1 8 32] [--time-limit 60]

On an embedded local Ray, the product's app (:func:`pipelines.serve.app.build_app`: ``ray.serve.llm``
vLLM replica + our ingress, 127.0.0.1, a free port) serves the guard; without ``--model`` the offline
tiny model is built into ``--workdir`` (random weights, so answers are constrained to the guard format,
``constrained: true``). A bounded load generator (asyncio + aiohttp, one process) sends ``POST
/v1/moderations`` with one text per request from ``c`` concurrent callers until ``--requests`` are
answered or ``--time-limit`` passes; each text is distinct (the guard prompt's taxonomy is a shared
prefix, the text is not). Two deployments of the same app:

- ``batched``: the ingress batches concurrent prompts into one engine call (``max_batch_size`` 32) and
  vLLM runs up to 256 sequences per step (its default);
- ``unbatched``: ``max_batch_size: 1`` and the engine's ``max_num_seqs: 1``: one request per engine step.

The ceiling is offline vLLM (``vllm.LLM.generate``) on the same prompts, as token ids rendered the
way the ingress renders them, with the same sampling (greedy, 4 tokens, the served config's top
log-probabilities, the same answer regex): prompts/s of one ``generate`` call, after a warm-up call. It runs after
Serve is shut down, alone on the machine.

Each level is warmed up with ``c`` requests first (not timed). A level that did not finish its
requests inside the time limit reports the rate of what it did finish, marked ``partial``; a level
with fewer than 20 answers prints ``n/a`` (too few to time). Targets (this issue, one run): batched
at concurrency 32 >= 3x unbatched at 32, and >= 0.6x the offline ceiling. Writes JSON (default
``bench_out/serve.json``).
"""

from __future__ import annotations

import argparse
import asyncio
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

MIN_ANSWERS = 20
TARGET_BATCHING, TARGET_CEILING = 3.0, 0.6
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


def serve_variant(model: str, port: int, batched: bool, args) -> dict[int, dict]:
    from ray import serve

    from pipelines.serve.app import APP_NAME, ROUTE_PREFIX, build_app
    from pipelines.serve.cli import serve_settings

    overrides = [f"model={model}", "constrained=true", "max_tokens=4", "ingress.max_ongoing_requests=256",
                 f"max_batch_size={32 if batched else 1}"]
    if not batched:
        overrides.append("engine.engine_kwargs.max_num_seqs=1")
    config, _, _ = serve_settings(argparse.Namespace(run_dir=None, overrides=overrides, model=None, stage=None,
                                                     config=args.config, host=None, port=None), cuda=False)
    started = time.perf_counter()
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
    print(f"\n{'batched' if batched else 'unbatched'}: app up in {time.perf_counter() - started:.1f} s", flush=True)
    url = f"http://127.0.0.1:{port}/v1/moderations"
    results = {}
    for level, c in enumerate(args.concurrency):
        asyncio.run(load(url, texts(c, args.seed + 1000 + level), c, args.time_limit))  # warm-up
        run = summarize(asyncio.run(load(url, texts(args.requests, args.seed + level), c, args.time_limit)))
        results[c] = run
        rate = "n/a" if run["rps"] is None else f"{run['rps']:.1f}"
        lat = "" if run["rps"] is None else f"  p50 {run['p50_ms']:.0f} ms  p99 {run['p99_ms']:.0f} ms"
        print(f"  concurrency {c:>3}: {run['answered']} answered in {run['wall_s']:.1f} s -> {rate} req/s{lat}"
              f"{'  (partial: time limit)' if run['partial'] else ''}"
              f"{'  failed ' + str(run['failed']) if run['failed'] else ''}",
              flush=True)
    serve.delete(APP_NAME)
    return results


def offline_ceiling(model: str, args) -> dict:
    """Prompts/s of ``vllm.LLM.generate`` on the benchmark's prompts, rendered as the ingress does."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from pipelines.core.config import CONFIGS
    from pipelines.core.prompts import prompt_token_ids
    from pipelines.core.taxonomy import load_taxonomy
    from pipelines.guard.adapters import ChillGuardAdapter
    from pipelines.guard.format import GuardPrompt
    from pipelines.serve.config import GuardServeConfig

    taxonomy = load_taxonomy(CONFIGS / "taxonomy.yaml")
    prompt = GuardPrompt(taxonomy)
    tok = AutoTokenizer.from_pretrained(model)
    ids = [prompt_token_ids(tok, prompt({"text": t}), {}) for t in texts(args.requests, args.seed)]
    pattern = ChillGuardAdapter(taxonomy, CONFIGS / "prompts" / "guard.yaml").answer_pattern("prompt")
    top_logprobs = GuardServeConfig.model_fields["top_logprobs"].default  # what the served ingress asks for
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=top_logprobs,
                            structured_outputs=StructuredOutputsParams(regex=pattern))
    llm = LLM(model=model, dtype="float32", max_model_len=4096, enforce_eager=True,
              kv_cache_memory_bytes=256 * 1024**2, seed=0)
    llm.generate([{"prompt_token_ids": i} for i in ids[:32]], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    wall = time.perf_counter() - start
    assert len(outputs) == len(ids)
    return {"prompts": len(ids), "wall_s": wall, "rps": len(ids) / wall,
            "prompt_tokens_mean": sum(map(len, ids)) / len(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="guard model folder (default: build the tiny model)")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/serve/cpu.yaml"))
    parser.add_argument("--requests", type=int, default=256, help="answered requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--time-limit", type=float, default=60, help="seconds per level")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
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
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        variants = {"batched": serve_variant(model, port, True, args),
                    "unbatched": serve_variant(model, port, False, args)}
        serve.shutdown()
    finally:
        ray.shutdown()
    ceiling = offline_ceiling(model, args)
    print(f"\noffline vLLM LLM.generate: {ceiling['prompts']} prompts ({ceiling['prompt_tokens_mean']:.0f} tokens "
          f"mean) in {ceiling['wall_s']:.2f} s -> {ceiling['rps']:.1f} prompts/s")

    top = max(args.concurrency)
    batched, unbatched = variants["batched"][top]["rps"], variants["unbatched"][top]["rps"]
    ratio = batched / unbatched if batched and unbatched else None
    share = batched / ceiling["rps"] if batched else None
    print(f"\nconcurrency {top}: batched / unbatched = {'n/a' if ratio is None else f'{ratio:.2f}x'} "
          f"(target >= {TARGET_BATCHING}x); batched / offline = {'n/a' if share is None else f'{share:.2f}x'} "
          f"(target >= {TARGET_CEILING}x)")
    finish({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "settings": {"requests": args.requests, "concurrency": args.concurrency, "time_limit_s": args.time_limit,
                         "model": model, "config": args.config},
            "variants": {name: {str(c): r for c, r in runs.items()} for name, runs in variants.items()},
            "offline": ceiling, "batched_over_unbatched": ratio, "batched_over_offline": share,
            "targets": {f"batched >= {TARGET_BATCHING}x unbatched at concurrency {top}":
                        ratio is not None and ratio >= TARGET_BATCHING,
                        f"batched >= {TARGET_CEILING}x offline vLLM": share is not None and share >= TARGET_CEILING}},
           args.out)


if __name__ == "__main__":
    main()
