"""Preprocessing stages: normalisation, exact and near-duplicate removal, length filter.

Each is its own stage with its own manifest and drop counts by reason. The first enabled one reads
the union of the recipe's ``preprocess.inputs`` (``rag``, ``pe``, ``seeds``, ...); each later one reads
the previous one. Deduplication is global: a first streaming pass computes a compact key per row
(a text hash, or a MinHash signature) - never the text - which is gathered and decided in one place;
a second streaming pass marks the duplicates ``dropped`` with the id they duplicate (``duplicate_of``).
The kept row of a group is the one with the smallest id, so the choice does not depend on block
order, partitioning or the number of workers, and is the same on every run.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from pipelines.core.config import (
    ADDED,
    CONFIGS,
    OPERATIONAL,
    ExistingPath,
    LLMEndpoint,
    ModelRef,
    Strict,
)
from pipelines.core.contracts import PASSTHROUGH
from pipelines.core.prompts import ChatPrompt, RenderRow
from pipelines.core.registry import References, register
from pipelines.core.rows import DROPPED, DUPLICATE_OF, ERROR, LINEAGE, OK, common_rows, fixed_list_to_numpy
from pipelines.core.stage import Stage
from pipelines.core.textnorm import normalize_text
from pipelines.data import minhash


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


#: target_lang -> the language's name in translation prompts
LANGUAGE_NAMES = {"zh": "简体中文", "en": "英文 (English)", "ja": "日文", "ko": "韩文", "fr": "法文", "de": "德文",
                  "es": "西班牙文", "ru": "俄文", "ar": "阿拉伯文"}


class TranslateConfig(Strict):
    """Translation of rows in ``source_langs``: a seq2seq model (MarianMT) in an actor pool, or an
    LLM endpoint under ``models:`` asked with a translation prompt (answers that are empty or open
    as a refusal become error rows with that reason)."""

    model: ModelRef | None = Field(None, description="seq2seq: Helsinki-NLP/opus-mt-en-zh in the paper recipe")
    endpoint: str | None = Field(None, description="instead of model: an LLM endpoint under `models:`",
                                 json_schema_extra=ADDED)
    template: ExistingPath = Field(str(CONFIGS / "prompts" / "translate.yaml"), validate_default=True,
                                   description="endpoint: the translation prompt (variables text, target_language)",
                                   json_schema_extra=ADDED)
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

    @model_validator(mode="after")
    def _one_translator(self) -> TranslateConfig:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("translate needs exactly one of model (seq2seq) or endpoint (an LLM under models:)")
        if self.endpoint is not None and self.target_lang not in LANGUAGE_NAMES:
            raise ValueError(f"target_lang {self.target_lang!r}: the translation prompt names "
                             f"{sorted(LANGUAGE_NAMES)}; add it to LANGUAGE_NAMES")
        return self


class LengthFilterConfig(Strict):
    min_chars: int = Field(5, ge=0)
    max_chars: int = Field(2000, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> LengthFilterConfig:
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
    def _bands_fit(self) -> NearDedupConfig:
        if self.bands is not None and self.bands > self.num_perm:
            raise ValueError(f"bands ({self.bands}) > num_perm ({self.num_perm})")
        return self


class PreprocessSteps(Strict):
    """The preprocessing chain: normalize -> langid -> translate -> length_filter -> dedup ->
    near_dedup; each step is its own stage (null skips it)."""

    normalize: NormalizeConfig | None = Field(default_factory=NormalizeConfig)
    langid: LangIdConfig | None = Field(default_factory=LangIdConfig)
    translate: TranslateConfig | None = None
    length_filter: LengthFilterConfig | None = Field(default_factory=LengthFilterConfig)
    dedup: DedupConfig | None = Field(default_factory=DedupConfig)
    near_dedup: NearDedupConfig | None = Field(default_factory=NearDedupConfig)

    STEPS: ClassVar[tuple[str, ...]] = ("normalize", "langid", "translate", "length_filter", "dedup",
                                        "near_dedup")

    @model_validator(mode="after")
    def _translate_needs_langid(self) -> PreprocessSteps:
        if self.translate is not None and self.langid is None:
            raise ValueError("translate needs langid (it translates rows by detected language)")
        return self


class PreprocessConfig(PreprocessSteps):
    """``stages.preprocess``: the chain over the union of ``inputs``."""

    inputs: list[str] = Field(min_length=1, description="upstream stages whose ok rows are merged")

log = logging.getLogger(__name__)



def with_status(batch: pa.Table, status: list[str], reason: list[str], detail: list[str]) -> pa.Table:
    batch = batch.drop_columns([c for c in ("status", "reason", "detail") if c in batch.column_names])
    return (batch.append_column("status", pa.array(status, pa.string()))
            .append_column("reason", pa.array(reason, pa.string()))
            .append_column("detail", pa.array(detail, pa.string())))


class PreprocessStage(Stage):
    """Base: reads one or more upstream stages (unioned, in the common schema: their own columns
    folded into ``lineage``); one-to-one, the rows keep their columns."""

    reads = frozenset({"id", "text"})
    writes = PASSTHROUGH | {LINEAGE}

    def __init__(self, config: Any, inputs: tuple[str, ...], *, name: str | None = None):
        super().__init__(config, name=name, inputs=inputs)

    def union(self, inputs: dict) -> Any:
        return common_rows(inputs, self.inputs)


# ------------------------------------------------------------------------------------------------
# Normalisation


def _t2s_converter():
    import opencc

    return opencc.OpenCC("t2s")


def normalize_batch(batch: pa.Table, *, form: str, t2s: bool) -> pa.Table:
    """Unicode form + whitespace/control cleanup (+ traditional -> simplified Chinese); rows empty
    afterwards become ``error`` rows (``empty_after_normalization``)."""
    convert = _t2s_converter().convert if t2s else None
    texts, status, reason, detail = [], [], [], []
    for text in batch.column("text").to_pylist():
        clean = normalize_text(text or "", form)
        if convert is not None:
            clean = convert(clean)
        texts.append(clean)
        if clean:
            status.append(OK), reason.append(""), detail.append("")
        else:
            status.append(ERROR), reason.append("empty_after_normalization"), detail.append(repr(text)[:200])
    batch = batch.set_column(batch.column_names.index("text"), "text", pa.array(texts, pa.string()))
    return with_status(batch, status, reason, detail)


class NormalizeStage(PreprocessStage):
    name = "normalize"

    def build(self, inputs: dict) -> Any:
        return self.union(inputs).map_batches(
            normalize_batch, batch_format="pyarrow",
            fn_kwargs={"form": self.config.form, "t2s": self.config.traditional_to_simplified})


# ------------------------------------------------------------------------------------------------
# Language identification and translation


@functools.lru_cache(maxsize=4)
def _detector(languages: tuple[str, ...]):
    """One lingua detector per worker process (Ray reuses task workers); models ship in the wheel."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    codes = [IsoCode639_1.from_str(code) for code in languages]
    return LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()


def detect_languages(texts: list[str], languages: tuple[str, ...], min_confidence: float) -> list[str]:
    """ISO 639-1 code per text among ``languages``; ``und`` when undetermined or below confidence."""
    detector = _detector(languages)
    if min_confidence <= 0:
        found = detector.detect_languages_in_parallel_of(texts)
        return [lang.iso_code_639_1.name.lower() if lang else "und" for lang in found]
    out = []
    for values in detector.compute_language_confidence_values_in_parallel(texts):
        best = values[0] if values else None
        ok = best is not None and best.value >= min_confidence
        out.append(best.language.iso_code_639_1.name.lower() if ok else "und")
    return out


def langid_batch(batch: pa.Table, *, languages: tuple[str, ...], keep: tuple[str, ...] | None,
                 min_confidence: float) -> pa.Table:
    langs = detect_languages(batch.column("text").to_pylist(), languages, min_confidence)
    batch = batch.set_column(batch.column_names.index("lang"), "lang", pa.array(langs, pa.string()))
    status = [DROPPED if keep is not None and lang not in keep else OK for lang in langs]
    reason = ["unsupported_language" if s == DROPPED else "" for s in status]
    detail = [f"detected {lang}, keeping {list(keep)}" if s == DROPPED else ""
              for s, lang in zip(status, langs)]
    return with_status(batch, status, reason, detail)


class LangIdStage(PreprocessStage):
    name = "langid"
    writes = PASSTHROUGH | {LINEAGE, "lang"}

    def build(self, inputs: dict) -> Any:
        cfg = self.config
        return self.union(inputs).map_batches(langid_batch, batch_format="pyarrow", fn_kwargs={
            "languages": tuple(cfg.languages), "keep": tuple(cfg.keep) if cfg.keep is not None else None,
            "min_confidence": cfg.min_confidence})


class TranslateStage(PreprocessStage):
    """Translation of rows in ``source_langs`` (the previous stage must be ``langid``), by a seq2seq
    model or an LLM endpoint."""

    name = "translate"
    reads = frozenset({"id", "text", "lang"})  # which rows to translate
    writes = PASSTHROUGH | {LINEAGE, "original_text"}

    def __init__(self, config: TranslateConfig, inputs: tuple[str, ...], endpoint: LLMEndpoint | None = None, *,
                 name: str | None = None):
        super().__init__(config, inputs, name=name)
        if (config.endpoint is None) != (endpoint is None):
            raise ValueError("translate: an endpoint is given exactly when the config names one")
        self.endpoint = endpoint
        self.prompt = ChatPrompt(config.template) if endpoint is not None else None

    def build(self, inputs: dict) -> Any:
        if self.endpoint is not None:
            return self._build_llm(inputs)
        import ray

        from actors.embedder import resolve_device
        from actors.translator import Translator

        cfg = self.config
        device = resolve_device(cfg)
        return self.union(inputs).map_batches(
            Translator, fn_constructor_kwargs={"config": cfg, "device": device},
            batch_size=cfg.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_cpus=cfg.num_cpus,
            num_gpus=1 if device == "cuda" else 0)

    def _build_llm(self, inputs: dict) -> Any:
        from actors.llm import chat
        from actors.translator import llm_translation_batch, untranslated_batch

        cfg = self.config
        rows = self.union(inputs)
        source = set(cfg.source_langs)
        todo = rows.filter(lambda r: r["lang"] in source)
        rest = rows.filter(lambda r: r["lang"] not in source).map_batches(untranslated_batch, batch_format="pyarrow")
        answers = chat(todo, self.endpoint,
                       RenderRow(self.prompt, {"target_language": LANGUAGE_NAMES[cfg.target_lang]}))
        return answers.map_batches(llm_translation_batch, batch_format="pyarrow",
                                   fn_kwargs={"target_lang": cfg.target_lang}).union(rest)


# ------------------------------------------------------------------------------------------------
# Length filter


def length_batch(batch: pa.Table, *, min_chars: int, max_chars: int) -> pa.Table:
    lengths = pc.utf8_length(batch.column("text")).to_pylist()
    status, reason, detail = [], [], []
    for n in lengths:
        if n < min_chars:
            status.append(DROPPED), reason.append("too_short"), detail.append(f"{n} < {min_chars} characters")
        elif n > max_chars:
            status.append(DROPPED), reason.append("too_long"), detail.append(f"{n} > {max_chars} characters")
        else:
            status.append(OK), reason.append(""), detail.append("")
    return with_status(batch, status, reason, detail)


class LengthFilterStage(PreprocessStage):
    name = "length_filter"

    def build(self, inputs: dict) -> Any:
        return self.union(inputs).map_batches(
            length_batch, batch_format="pyarrow",
            fn_kwargs={"min_chars": self.config.min_chars, "max_chars": self.config.max_chars})


# ------------------------------------------------------------------------------------------------
# Deduplication (shared two-pass shape)


def _gather(dataset, columns: list[str]) -> list[list[Any]]:
    """Collect small key columns in the driver, batch by batch."""
    out: list[list[Any]] = [[] for _ in columns]
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=65536):
        for values, column in zip(out, columns):
            values.extend(batch.column(column).to_pylist())
    return out


def mark_duplicates(batch: pa.Table, *, duplicates: dict[str, str], reason: str) -> pa.Table:
    """Second pass: rows whose id is in ``duplicates`` are dropped, with the id they duplicate."""
    ids = batch.column("id").to_pylist()
    kept_ids = [duplicates.get(i, "") for i in ids]
    status = [DROPPED if k else OK for k in kept_ids]
    reasons = [reason if k else "" for k in kept_ids]
    detail = [f"duplicate of {k}" if k else "" for k in kept_ids]
    batch = batch.drop_columns([DUPLICATE_OF]) if DUPLICATE_OF in batch.column_names else batch
    return with_status(batch.append_column(DUPLICATE_OF, pa.array(kept_ids, pa.string())),
                        status, reasons, detail)


def exact_key(text: str, casefold: bool) -> str:
    """The dedup key: sha1 of the (already normalised) text, optionally case-folded."""
    return hashlib.sha1((text.casefold() if casefold else text).encode("utf-8")).hexdigest()


def exact_keys_batch(batch: pa.Table, *, casefold: bool) -> pa.Table:
    keys = [exact_key(t or "", casefold) for t in batch.column("text").to_pylist()]
    return pa.table({"id": batch.column("id"), "key": pa.array(keys, pa.string())})


def decide_exact(ids: list[str], keys: list[str]) -> dict[str, str]:
    """``{duplicate id: kept id}``: within each key the smallest id is kept."""
    kept: dict[str, str] = {}
    for row_id, key in zip(ids, keys):
        if key not in kept or row_id < kept[key]:
            kept[key] = row_id
    return {row_id: kept[key] for row_id, key in zip(ids, keys) if kept[key] != row_id}


class DedupStage(PreprocessStage):
    """Exact duplicates on normalised text."""

    name = "dedup"
    reason = "exact_duplicate"

    def duplicates(self, dataset) -> dict[str, str]:
        keys = dataset.map_batches(exact_keys_batch, batch_format="pyarrow",
                                   fn_kwargs={"casefold": self.config.casefold})
        ids, values = _gather(keys, ["id", "key"])
        return decide_exact(ids, values)

    def build(self, inputs: dict) -> Any:
        dataset = self.union(inputs).materialize()  # read once, used by both passes
        duplicates = self.duplicates(dataset)
        log.info("%s: %d duplicates", self.name, len(duplicates))
        return dataset.map_batches(mark_duplicates, batch_format="pyarrow",
                                   fn_kwargs={"duplicates": duplicates, "reason": self.reason})


# ------------------------------------------------------------------------------------------------
# Near duplicates (MinHash LSH)


def signature_batch(batch: pa.Table, *, num_perm: int, ngram: int, seed: int) -> pa.Table:
    a, b = minhash.permutations(num_perm, seed)
    sigs = minhash.signatures([t or "" for t in batch.column("text").to_pylist()], a, b, ngram)
    return pa.table({"id": batch.column("id"),
                     "signature": pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1)), num_perm)})


def decide_near(ids: list[str], sigs: np.ndarray, config: NearDedupConfig) -> dict[str, str]:
    """``{duplicate id: kept id}`` from MinHash LSH clusters; rows are ordered by id first, so each
    cluster keeps its smallest id whatever order the rows arrived in."""
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    sorted_ids = [ids[i] for i in order]
    bands, rows = (config.bands, config.num_perm // config.bands) if config.bands else \
        minhash.optimal_bands(config.threshold, config.num_perm)
    labels = minhash.duplicate_groups(sigs[order], bands, rows, config.threshold, verify=config.verify)
    return {sorted_ids[i]: sorted_ids[label] for i, label in enumerate(labels) if label != i}


class NearDedupStage(DedupStage):
    """Near duplicates: MinHash over character n-grams, LSH banding, Jaccard-verified candidates."""

    name = "near_dedup"
    reason = "near_duplicate"

    def duplicates(self, dataset) -> dict[str, str]:
        cfg = self.config
        sigs = dataset.map_batches(signature_batch, batch_format="pyarrow",
                                   fn_kwargs={"num_perm": cfg.num_perm, "ngram": cfg.ngram, "seed": cfg.seed})
        ids, columns = [], []
        for batch in sigs.iter_batches(batch_format="pyarrow", batch_size=65536):
            ids.extend(batch.column("id").to_pylist())
            columns.append(fixed_list_to_numpy(batch.column("signature")))
        if not ids:
            return {}
        return decide_near(ids, np.concatenate(columns).astype(np.uint32), cfg)


STEP_STAGES = {"normalize": NormalizeStage, "langid": LangIdStage, "translate": TranslateStage,
               "length_filter": LengthFilterStage, "dedup": DedupStage, "near_dedup": NearDedupStage}


def _steps(config: PreprocessSteps) -> list[str]:
    return [step for step in PreprocessSteps.STEPS if getattr(config, step) is not None]


def build_steps(config: PreprocessSteps, inputs: tuple[str, ...], models: dict[str, LLMEndpoint],
                prefix: str = "") -> list[Stage]:
    """One stage per enabled step, each reading the one before (the first: the union of ``inputs``),
    named ``<prefix><step>`` (the loop preprocesses its candidates as ``loop1_normalize``, ...);
    ``models``: the recipe's endpoints (an LLM translation names one)."""
    stages: list[Stage] = []
    upstream = tuple(inputs)
    for step in _steps(config):
        step_config = getattr(config, step)
        name = f"{prefix}{STEP_STAGES[step].name}"
        if step == "translate" and step_config.endpoint is not None:
            stage = TranslateStage(step_config, upstream, models[step_config.endpoint], name=name)
        else:
            stage = STEP_STAGES[step](step_config, upstream, name=name)
        stages.append(stage)
        upstream = (stage.name,)
    return stages


def _check(config: PreprocessConfig, refs: References) -> dict[str, str | None]:
    refs.check_inputs("stages.preprocess.inputs", config.inputs)
    return translation_endpoint(config, "stages.preprocess")


def translation_endpoint(config: PreprocessSteps, key: str) -> dict[str, str]:
    """``{key.translate.endpoint: name}`` when translation names an endpoint (checked under models:)."""
    if config.translate is None or config.translate.endpoint is None:
        return {}
    return {f"{key}.translate.endpoint": config.translate.endpoint}


register("preprocess", config=PreprocessConfig, provides="rows", names=_steps,
         build=lambda recipe, config: build_steps(config, tuple(config.inputs), recipe.models),
         check=_check)
