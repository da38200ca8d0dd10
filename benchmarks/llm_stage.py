"""LLM stage throughput: bare vLLM vs stock ray.data.llm vs our LLM stage, same prompts and model.

    python benchmarks/llm_stage.py [--model DIR] [--prompts 40000] [--warm 1000] [--max-tokens 32]

Steady-state rate is the marginal rate between the ``--warm``-th and the last prompt (engine start-up
and the first batches are reported separately). For the Ray variants it is read off the rows'
production times and reported only when rows stream out (see :func:`benchmarks.report.steady_rate`);
otherwise it is ``n/a`` with the reason. On 2 CPUs a few thousand prompts reach the timestamping map
in bursts, hence the default of 40,000. The bare engine's start-up is printed beside the Ray
variants' time to first row. Each request generates exactly ``--max-tokens`` tokens
(``ignore_eos``), so the three variants do the same work. Prints a table and writes JSON.
Without ``--model`` the offline tiny Qwen3 is built into a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.report import steady_rate
from pipelines.core.config import LLMEndpoint

DOCS = ["网络上有人散布关于健康的虚假信息，请把它改写成用户的提问。", "A user asks how to report a scam website.",
        "某公司利用算法优势排挤竞争对手。", "Please summarise the privacy policy in two sentences."]


def make_rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "text": f"{DOCS[i % len(DOCS)]} #{i}"} for i in range(n)]


def messages(row: dict) -> list[dict]:
    return [{"role": "user", "content": f"Rewrite as a user prompt: {row['text']}"}]


def bare_vllm(endpoint: LLMEndpoint, rows: list[dict], warm: int) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(endpoint.model)
    prompts = [tok.apply_chat_template(messages(r), tokenize=False, add_generation_prompt=True) for r in rows]
    t0 = time.perf_counter()
    llm = LLM(model=endpoint.model, **endpoint.engine_kwargs)
    startup = time.perf_counter() - t0
    params = SamplingParams(**endpoint.sampling.to_params())
    t1 = time.perf_counter()
    first = llm.generate(prompts[:warm], params, use_tqdm=False)
    t2 = time.perf_counter()
    rest = llm.generate(prompts[warm:], params, use_tqdm=False)
    t3 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in rest)
    total = tokens + sum(len(o.outputs[0].token_ids) for o in first)
    # one generate() call over the rest: the engine's own steady state, measurable by construction
    result = {"startup_s": startup, "first_row_s": None, "first_batch_s": t2 - t1,
              "steady_tokens": tokens, "steady_s": t3 - t2, "tok_per_s": tokens / (t3 - t2),
              "why_na": None, "total_tokens": total, "wall_s": t3 - t0,
              "end_to_end_tok_per_s": total / (t3 - t0)}
    llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
    del llm
    gc.collect()
    return result


def _stamp(batch):
    """Benchmark-only: when each output batch was produced (fused into the producing task)."""
    import pyarrow as pa

    return batch.append_column("t_done", pa.array([time.time()] * batch.num_rows, pa.float64()))


def _rates(dataset, tokens_column: str, warm: int, t0: float) -> dict:
    """Time to first row, the steady rate after ``warm`` rows (or ``n/a`` and why), end-to-end rate.

    Production timestamps (not the driver's consumption times) are used because Ray Data buffers
    finished blocks: the driver may receive them in bursts. ``arrivals`` (seconds after start, rows)
    per distinct production time lets a reader check the steadiness verdict.
    """
    rows = dataset.select_columns([tokens_column, "t_done"]).take_all()
    done = [r["t_done"] for r in rows]
    tokens = [r[tokens_column] for r in rows]
    wall = max(done) - t0
    arrivals = Counter(round(t - t0, 3) for t in done)
    return {"startup_s": None, "first_row_s": min(done) - t0, "rows": len(rows),
            **steady_rate(done, tokens, warm, t0), "total_tokens": sum(tokens), "wall_s": wall,
            "end_to_end_tok_per_s": sum(tokens) / wall, "arrivals": sorted(arrivals.items())}


def stock_ray_data_llm(endpoint: LLMEndpoint, rows: list[dict], warm: int) -> dict:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    sampling = endpoint.sampling.to_params()
    config = vLLMEngineProcessorConfig(
        model_source=endpoint.model, engine_kwargs=dict(endpoint.engine_kwargs),
        batch_size=endpoint.batch_size, concurrency=1,
        max_concurrent_batches=endpoint.max_concurrent_batches, log_engine_metrics=False)
    processor = build_processor(
        config,
        preprocess=lambda row: {"messages": messages(row), "sampling_params": dict(sampling)},
        postprocess=lambda row: {"id": row["id"], "n_tokens": row["num_generated_tokens"]})
    t0 = time.time()
    out = processor(ray.data.from_items(rows)).map_batches(_stamp, batch_format="pyarrow")
    return _rates(out, "n_tokens", warm, t0)


def our_stage(endpoint: LLMEndpoint, rows: list[dict], warm: int) -> dict:
    import ray

    from actors.llm import chat

    t0 = time.time()
    out = chat(ray.data.from_items(rows), endpoint, messages).map_batches(_stamp, batch_format="pyarrow")
    return _rates(out, "llm_output_tokens", warm, t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or HF id (default: build the tiny model)")
    parser.add_argument("--prompts", type=int, default=40_000)
    parser.add_argument("--warm", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-concurrent-batches", type=int, default=8)
    parser.add_argument("--engine-kwargs", default='{"dtype": "float32", "max_model_len": 1024, '
                        '"enforce_eager": true, "kv_cache_memory_bytes": 536870912, "seed": 0}')
    parser.add_argument("--out", default="bench_out/llm_stage.json")
    parser.add_argument("--only", nargs="*", default=["bare", "stock", "ours"])
    args = parser.parse_args()

    model = args.model
    if model is None:
        from pipelines.training.tiny_models import build_tiny_models

        model = build_tiny_models(tempfile.mkdtemp(prefix="tiny"))["causal-lm"]
    endpoint = LLMEndpoint(engine="vllm", model=model, engine_kwargs=json.loads(args.engine_kwargs),
                           sampling={"temperature": 0.7, "max_tokens": args.max_tokens, "ignore_eos": True},
                           batch_size=args.batch_size, max_concurrent_batches=args.max_concurrent_batches)
    rows = make_rows(args.prompts)
    results: dict[str, dict] = {}
    if "bare" in args.only:
        results["bare_vllm"] = bare_vllm(endpoint, rows, args.warm)
    if {"stock", "ours"} & set(args.only):
        import ray

        from cluster.connect import cuda_device_count

        ray.init(address="local", num_gpus=cuda_device_count() or 1, include_dashboard=False)
        if "stock" in args.only:
            results["stock_ray_data_llm"] = stock_ray_data_llm(endpoint, rows, args.warm)
        if "ours" in args.only:
            results["chillguard_stage"] = our_stage(endpoint, rows, args.warm)
        ray.shutdown()
    base = results.get("bare_vllm", {}).get("tok_per_s")
    for r in results.values():
        r["ratio_to_bare"] = r["tok_per_s"] / base if base and r["tok_per_s"] else None
    report = {
        "benchmark": "llm_stage", "model": model, "prompts": args.prompts, "warm": args.warm,
        "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "max_concurrent_batches": args.max_concurrent_batches,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "gpu": __import__("cluster.connect", fromlist=["x"]).cuda_device_count()},
        "results": results,
    }
    print("\nstart-up = the bare engine's init; first row = Ray variants' time to their first output row.\n"
          "steady = marginal rate after the warm-up prompts, n/a where rows do not stream out (reason\n"
          "below); end-to-end includes start-up.")
    print(f"{'variant':<22}{'start-up s':>11}{'first row s':>12}{'steady tok/s':>14}{'ratio':>8}"
          f"{'wall s':>9}{'e2e tok/s':>11}")

    def cell(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    for name, r in results.items():
        print(f"{name:<22}{cell(r['startup_s'], '.1f'):>11}{cell(r['first_row_s'], '.1f'):>12}"
              f"{cell(r['tok_per_s'], ',.0f'):>14}{cell(r['ratio_to_bare'], '.2f'):>8}{r['wall_s']:>9.1f}"
              f"{r['end_to_end_tok_per_s']:>11,.0f}")
    for name, r in results.items():
        if r["why_na"]:
            print(f"{name}: no steady rate: {r['why_na']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
