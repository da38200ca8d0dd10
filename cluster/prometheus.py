"""Reading a Prometheus text export (a Ray node's ``/metrics``, a ``vllm serve`` endpoint's): one
parser for the benchmarks and tests, ``prometheus_client``'s (labels with escaped quotes, histograms'
``_sum`` / ``_count`` / ``_bucket`` samples, counters' ``_total`` samples as they are exported)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")


def scrape(url: str, timeout: float = 10) -> str:
    """The export at ``url`` (``http://host:port/metrics``)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.read().decode()


def node_metrics_url() -> str:
    """The Prometheus export of this process's Ray node (Ray's metrics, ``ray.util.metrics``, and the
    engine metrics of ``ray.serve.llm`` replicas)."""
    import ray

    return f"http://127.0.0.1:{ray._private.worker._global_node.metrics_export_port}/metrics"


def metric_sum(text: str, name: str, default: float | None = 0.0, **labels: str) -> float | None:
    """Sum of the samples named ``name`` whose labels include ``labels``; ``default`` when none is.

    Only the export's lines that start with ``name`` are parsed (as untyped samples, which keep their
    names): a Ray node's export is thousands of lines, and pollers call this several times a second."""
    lines = "\n".join(line for line in text.splitlines() if line.startswith(name))
    values = [sample.value for family in text_string_to_metric_families(lines) for sample in family.samples
              if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())]
    return sum(values) if values else default


def vllm_counter(text: str, name: str) -> float | None:
    """vLLM's counter ``vllm:<name>`` (e.g. ``prefix_cache_hits``) as Ray's export names it, ``ray_vllm:<name>_total``
    or ``ray_vllm_<name>_total`` by Ray version, summed over replicas; None when the export has neither."""
    found = [metric_sum(text, f"ray_vllm{sep}{name}_total", default=None) for sep in (":", "_")]
    return None if all(v is None for v in found) else sum(v or 0.0 for v in found)


def prefix_cache_counters(text: str) -> tuple[float, float] | None:
    """``(hits, queries)`` of vLLM's prefix cache, in prompt tokens, summed over replicas; None before any
    engine exported its queries. Ray exports a counter from its first increment, so a prompt that never
    filled a whole KV block (short prompts: no hit yet) has queries and no hits line: 0 hits, not unknown."""
    queries = vllm_counter(text, "prefix_cache_queries")
    return None if queries is None else (vllm_counter(text, "prefix_cache_hits") or 0.0, queries)


def settled(read: Callable[[], T], *, every_s: float = 12, timeout_s: float = 40) -> T:
    """``read()`` once two reads ``every_s`` apart agree (Ray exports each process's metrics on a 10 s tick,
    so a read right after the work may miss its last seconds); the last read after ``timeout_s``."""
    deadline, last = time.monotonic() + timeout_s, read()
    while time.monotonic() < deadline:
        time.sleep(every_s)
        now = read()
        if now == last:
            return now
        last = now
    return last
