"""Corpus ingestion: stream JSONL / Parquet / CSV (files or folders, local or cloud URIs) into rows.

JSONL is read as text lines and parsed per row, so a malformed line becomes an ``error`` row
(``invalid_json``) instead of failing the read. Rows whose text is missing, not a string, or empty go
to ``error`` with a reason. Text is normalised (Unicode form, control characters, whitespace
runs). The corpus is never materialised in the driver: this is a lazy Ray
Dataset that the runner streams to Parquet. The mapping is checked against each input's head in the
driver when the stage is built (:func:`check_columns`), before Ray starts.

``format: json`` reads files that each hold one JSON document (a release such as Safety-Prompts'
``{scenario: [records]}``): a document cannot be split into lines, so each file is parsed whole by one
task (:func:`json_records`); a file that is not such a document is one ``error`` row.

Categories: ``macro_map`` maps the dataset's macro values onto our macro codes (unmapped: ``""``);
``micro_map`` maps its micro values onto the taxonomy's micro codes, and a value it does not map is an
``error`` row (``unmapped_micro``), because a micro category decides which per-category F1 a row
counts in. A mapped micro fills an empty macro with the taxonomy's; a macro from ``macro_map`` that
contradicts it is an ``error`` row (``macro_micro_mismatch``): which of two disagreeing gold labels is
right cannot be decided here. Both maps' targets are checked against the taxonomy when the recipe is
built (:func:`category_codes`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from pipelines.core.config import ADDED, ConfigError, ExistingPath, Strict
from pipelines.core.registry import References, register
from pipelines.core.rows import DROPPED, ERROR, content_id, error_detail, make_row, to_table
from pipelines.core.rundir import source_fingerprint
from pipelines.core.stage import Stage
from pipelines.core.taxonomy import DEFAULT_TAXONOMY, load_taxonomy
from pipelines.core.textnorm import normalize_text


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
    split: str | None = Field(None, description="the dataset's own split (train / test): kept as column "
                              "`split`, which guard evaluation and the loop read like assemble's",
                              json_schema_extra=ADDED)


class IngestConfig(Strict):
    """Stream a corpus or a labelled seed dataset (JSONL / Parquet / CSV files or folders, local or
    cloud URIs). Column names may be dotted paths into nested records (``metadata.language``)."""

    paths: list[ExistingPath] = Field(min_length=1)
    format: Literal["jsonl", "json", "parquet", "csv"] | None = Field(
        None, description="default: from the first path's extension (.json is read as JSONL); json: "
        "one JSON document per file, a list of records or an object {key: [records]}")
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
    micro_map: dict[str, str] = Field(
        default_factory=dict, json_schema_extra=ADDED,
        description="raw micro value (columns.micro) -> micro code of the taxonomy, or \"\" for a value "
        "that names no category (a safe row, untargeted abuse); other non-empty values are errors "
        "(unmapped_micro); an empty macro becomes the micro code's")
    lang: str | None = Field(None, description="one language code for every row")
    split: str | None = Field(None, json_schema_extra=ADDED,
                              description="one split for every row (a set shipped as train/test files)")
    keep: dict[str, list[str]] = Field(
        default_factory=dict, description="keep rows whose column value is listed; others dropped")
    sample: float | None = Field(
        None, gt=0, le=1, json_schema_extra=ADDED,
        description="keep this share of the rows, drawn by a hash of each row's id and sample_seed (the "
        "same rows on every run and machine, whatever the file order); the others are dropped "
        "(not_sampled). For a quick run over a public set")
    sample_seed: int = Field(0, json_schema_extra=ADDED)
    require_response: bool = Field(
        False, json_schema_extra=ADDED,
        description="response-level sets: a row without a response is an error (missing_response)")
    prompt: str | None = Field(
        None, json_schema_extra=ADDED,
        description="one user prompt for every row, and each record's columns.response as the answer to "
        "it: a set labelled per text read as assistant answers, for response-level guards and streaming "
        "moderation (implies require_response; columns.text is not read)")
    group_column: str = Field(
        "group", json_schema_extra=ADDED,
        description="format json, an object {key: [records]}: the column that receives each list's "
        "key (a record's own value wins)")

    @field_validator("label_map", "macro_map", "micro_map", mode="before")
    @classmethod
    def _text_keys(cls, value: Any) -> Any:
        """YAML reads ``true:`` / ``1:`` as a bool / number key; raw values are matched as the text
        :func:`as_text` makes of them, so the keys are written the same way."""
        if not isinstance(value, dict):
            return value
        return {as_text(k) if isinstance(k, (bool, int, float)) else k: v for k, v in value.items()}

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
    def _infer_format(self) -> IngestConfig:
        if self.format is None:
            suffix = Path(self.paths[0]).suffix.lower()
            by_suffix = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
            if suffix not in by_suffix:
                raise ValueError(f"cannot infer format from {self.paths[0]!r}; set format")
            self.__dict__["format"] = by_suffix[suffix]  # plain set: no re-validation loop
        return self

    @model_validator(mode="after")
    def _columns_for_settings(self) -> IngestConfig:
        """Settings that read a column need it mapped: without one they would silently do nothing."""
        if self.micro_map and not self.columns.micro:
            raise ValueError("micro_map maps the values of columns.micro: set columns.micro")
        if self.prompt is not None:
            if not self.prompt.strip():
                raise ValueError("prompt is empty: give the user prompt every row's answer replies to")
            if not self.columns.response:
                raise ValueError("prompt reads each record's answer from columns.response: set it")
            self.__dict__["require_response"] = True  # the label is the answer's; ids must cover it
        if self.require_response and not self.columns.response:
            raise ValueError("require_response needs columns.response")
        return self

# source file; paired response; the dataset's own harm category and level (SHARD stratifies by level)
ORIGIN = {"origin": pa.string(), "response": pa.string(), "harm_category": pa.string(),
          "harm_level": pa.string(), "split": pa.string()}
#: ColumnMap field -> row column, for the fields kept as they are
_KEPT = {"lang": "lang", "macro": "macro", "micro": "micro", "response": "response",
         "category": "harm_category", "level": "harm_level", "split": "split"}
#: joins the values of a multi-valued category (a list, or the true flags of BeaverTails' 14-flag
#: record); not a comma, which BeaverTails' own flag names contain
CATEGORY_SEPARATOR = "; "

#: a problem with a record: (reason, detail)
Problem = tuple[str, str]


class MissingColumnError(ConfigError):
    """An input lacks a column the mapping names (a recipe problem: ``chillguard run`` prints it
    as one line)."""


class InputFormatError(ConfigError):
    """An input is not in the recipe's ``format`` (a JSON document read as JSONL, or the reverse)."""


class JSONShapeError(ValueError):
    """A ``format: json`` document is neither a list of records nor an object of record lists."""


def lookup(record: dict[str, Any], column: str) -> Any:
    """``record[column]``, where ``column`` may be a dotted path into nested objects."""
    value: Any = record
    for part in column.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def as_text(value: Any) -> str:
    """A raw column value as the text maps are keyed by and rows keep: booleans as ``true`` /
    ``false`` (JSON's and YAML's spelling, not Python's), a record of flags as its true flags' names
    and a list as its items, each joined by :data:`CATEGORY_SEPARATOR` (in the dataset's order)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return CATEGORY_SEPARATOR.join(str(name) for name, flag in value.items() if flag)
    if isinstance(value, (list, tuple)):
        return CATEGORY_SEPARATOR.join(as_text(item) for item in value if item not in (None, ""))
    return str(value)


def category_codes(config: IngestConfig, taxonomy: str | Path = DEFAULT_TAXONOMY,
                   where: str = "stages.ingest") -> dict[str, str]:
    """The macro code of every micro code ``micro_map`` maps to, after checking both maps' targets
    against the taxonomy; raises :class:`ConfigError` naming ``<where>.micro_map`` (or ``macro_map``),
    the bad code and the raw value mapped to it. Called by the recipe check and by the stage, whose
    rows take a mapped micro's macro from the result."""
    if not config.macro_map and not config.micro_map:
        return {}
    tax = load_taxonomy(taxonomy)
    for setting, targets, known in (("macro_map", config.macro_map, tax.macro_codes),
                                    ("micro_map", config.micro_map, tax.micro_codes)):
        bad = {raw: code for raw, code in targets.items()
               if code not in known and not (code == "" and setting == "micro_map")}
        if bad:
            raw, code = next(iter(bad.items()))
            kind = setting.removesuffix("_map")
            raise ConfigError(f"{where}.{setting}: {code!r} (for {raw!r}) is not a {kind} code of the taxonomy "
                              f"{taxonomy} ({kind} codes: {', '.join(known)})"
                              + (f"; also bad: {sorted(set(bad.values()) - {code})}" if len(bad) > 1 else ""))
    return {code: tax.macro_of(code) for code in config.micro_map.values() if code}


def _map_label(record: dict[str, Any], config: IngestConfig, fields: dict[str, Any]) -> Problem | None:
    """Sets ``fields["label"]`` from ``label`` or the label column through ``label_map``."""
    if config.label:
        fields["label"] = config.label
        return None
    column = config.columns.label
    if not column:
        return None
    raw = lookup(record, column)
    mapping = config.label_map or {"safe": "safe", "unsafe": "unsafe"}
    if raw is None or as_text(raw) == "":
        return "missing_label", f"no label in column {column!r}"
    if as_text(raw) not in mapping:
        return "unknown_label", f"label {raw!r} is not one of {sorted(mapping)}"
    fields["label"] = mapping[as_text(raw)]
    return None


def _map_categories(config: IngestConfig, fields: dict[str, Any],
                    micro_macros: Mapping[str, str] | None) -> Problem | None:
    """Applies ``macro_map`` and ``micro_map`` to the raw values in ``fields`` (see the module
    docstring for the rules); ``micro_macros``: :func:`category_codes` of the config."""
    if config.macro_map:
        fields["macro"] = config.macro_map.get(fields.get("macro", ""), "")
    raw = fields.get("micro", "")
    if not config.micro_map or raw == "":
        return None
    fields["micro"] = ""
    if raw not in config.micro_map:
        return "unmapped_micro", f"micro value {raw!r} is not a key of micro_map"
    code = config.micro_map[raw]
    if code == "":  # mapped to no category on purpose
        return None
    if micro_macros is None or code not in micro_macros:
        raise ValueError(f"micro_map maps to {code!r}, but its macro was not given: pass "
                         "micro_macros=category_codes(config, taxonomy)")
    fields["micro"], macro = code, micro_macros[code]
    if not config.macro_map or not fields.get("macro"):
        fields["macro"] = macro
    elif fields["macro"] != macro:
        return "macro_micro_mismatch", (f"macro_map gives {fields['macro']!r}, but micro {code!r} "
                                        f"(from {raw!r}) is under macro {macro!r}")
    return None


def _missing_response(config: IngestConfig, fields: dict[str, Any]) -> Problem | None:
    """A response-level row is labelled by its response: without one it cannot be judged."""
    if config.require_response and not fields.get("response", "").strip():
        return "missing_response", f"response-level set, but column {config.columns.response!r} holds no response"
    return None


def _row_id(raw_id: Any, key: str, *salt: str) -> str:
    """The dataset's own id, else a content id of ``key`` (and ``salt``)."""
    return str(raw_id) if raw_id not in (None, "") else content_id(key, *salt)


def sampled(row_id: str, share: float, seed: int) -> bool:
    """Whether a row is in a ``share`` sample: ``u < share`` for ``u``, the first 8 bytes of
    sha256(seed, id) read as a fraction of 2^64 (uniform, independent of the row's position)."""
    digest = hashlib.sha256(f"{seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def record_to_row(record: Any, config: IngestConfig, origin: str,
                  micro_macros: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One input record (dict) -> one row with normalised text and mapped label/macro/micro.

    Problems become an error row with a reason (``not_an_object``, ``missing_text``, ``non_text``,
    ``empty_text``, ``missing_label``, ``unknown_label``, ``unmapped_micro``, ``macro_micro_mismatch``,
    ``missing_response``); rows outside ``keep`` are dropped (``filtered_out``), good rows outside
    ``sample`` too (``not_sampled``; error rows are kept: they are the set's own). ``micro_macros``:
    :func:`category_codes` of the config, needed when it has a ``micro_map``.
    """
    columns = config.columns
    if not isinstance(record, dict):
        return make_row(id=content_id(repr(record)), source=config.source, method="ingest",
                        origin=origin, status=ERROR, reason="not_an_object", detail=error_detail(record))
    raw_id = lookup(record, columns.id) if columns.id else None
    text = config.prompt if config.prompt is not None else lookup(record, columns.text)
    fields: dict[str, Any] = {"source": config.source, "method": config.preset or "ingest",
                              "origin": origin}
    for name, field in _KEPT.items():
        column = getattr(columns, name)
        if column and lookup(record, column) is not None:
            fields[field] = as_text(lookup(record, column))
    if config.lang:
        fields["lang"] = config.lang
    if config.split:
        fields["split"] = config.split
    label_problem = _map_label(record, config, fields)
    category_problem = _map_categories(config, fields, micro_macros)  # also for error rows: shows the reading
    problem = label_problem or category_problem or _missing_response(config, fields)
    for column, allowed in config.keep.items():
        if str(lookup(record, column)) not in allowed:
            return make_row(id=_row_id(raw_id, repr(record)), status=DROPPED, reason="filtered_out",
                            detail=f"{column}={lookup(record, column)!r} not in {allowed}", **fields)
    if text is None:
        problem = ("missing_text", error_detail(record))
    elif not isinstance(text, str):
        problem = ("non_text", error_detail(record))
    elif len(text := normalize_text(text, config.normalize)) < config.min_chars:
        problem = ("empty_text", error_detail(record))
    # a response-level row is the pair: two responses to one prompt (BeaverTails repeats prompts) are
    # two rows with their own labels, so their id covers the response too
    salt = (fields.get("response", ""),) if config.require_response else ()
    if problem is None:
        row_id = _row_id(raw_id, text, *salt)
        if config.sample is not None and not sampled(row_id, config.sample, config.sample_seed):
            return make_row(id=row_id, text=text, status=DROPPED, reason="not_sampled",
                            detail=f"sample {config.sample} (seed {config.sample_seed})", **fields)
        return make_row(id=row_id, text=text, **fields)
    key = text if isinstance(text, str) and text else repr(record)
    return make_row(id=_row_id(raw_id, key, *salt), status=ERROR, reason=problem[0], detail=problem[1], **fields)


def parse_jsonl_batch(batch: pa.Table, *, config: IngestConfig,
                      micro_macros: Mapping[str, str] | None = None) -> pa.Table:
    rows = []
    for line, origin in zip(batch.column("text").to_pylist(), batch.column("path").to_pylist()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(make_row(id=content_id(line), source=config.source, method="ingest", origin=origin,
                                 status=ERROR, reason="invalid_json",
                                 detail=error_detail(f"{exc}: {line}")))
            continue
        rows.append(record_to_row(record, config, origin, micro_macros))
    return to_table(rows, ORIGIN)


def _shape(document: Any) -> str:
    if isinstance(document, dict):
        odd = sorted(k for k, v in document.items() if not isinstance(v, list))
        return f"an object whose values under {_listing(odd, 5)} are not lists" if odd else "an empty object"
    return f"a JSON {type(document).__name__}"


def json_records(document: Any, group_column: str) -> list[Any]:
    """The records of one ``format: json`` document: a list of records, or an object of record lists
    (Safety-Prompts' ``{scenario: [records]}``) flattened in the document's order, each list's key
    written to ``group_column`` of its records (a record's own value wins: it is the dataset's).
    Any other shape raises :class:`JSONShapeError`: guessing where records hide would ingest the
    wrong objects."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        return [{group_column: key, **record} if isinstance(record, dict) else record
                for key, records in document.items() for record in records]
    raise JSONShapeError(f"is {_shape(document)}; format json reads a list of records or an object "
                         "{key: [records, ...]}")


def _file_error(config: IngestConfig, origin: str, reason: str, detail: str) -> dict[str, Any]:
    return make_row(id=content_id(origin, reason), source=config.source, method="ingest", origin=origin,
                    status=ERROR, reason=reason, detail=error_detail(f"{origin}: {detail}"))


def parse_json_batch(batch: pa.Table, *, config: IngestConfig,
                     micro_macros: Mapping[str, str] | None = None) -> pa.Table:
    """Whole files (``bytes``, ``path``) -> their records' rows; a file that does not parse is one
    ``invalid_json`` row, one of another shape one ``invalid_json_shape`` row."""
    rows = []
    for data, origin in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        try:
            records = json_records(json.loads(data), config.group_column)
        except JSONShapeError as exc:
            rows.append(_file_error(config, origin, "invalid_json_shape", f"the document {exc}"))
            continue
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            rows.append(_file_error(config, origin, "invalid_json", str(exc)))
            continue
        rows += [record_to_row(record, config, origin, micro_macros) for record in records]
    return to_table(rows, ORIGIN)


#: names Ray Data's folder listing skips (relative path prefixes), and the extensions its Parquet
#: and CSV readers take from a folder (``ray.data.read_parquet`` / ``read_csv``); JSONL and JSON
#: folders are read with ``read_text`` / ``read_binary_files``, which take every file
_SKIPPED_PREFIXES = (".", "_")
_FOLDER_EXTENSIONS = {"jsonl": None, "json": None, "parquet": (".parquet",),
                      "csv": (".csv", ".csv.gz", ".csv.br", ".csv.zst", ".csv.lz4")}

#: a schema as nested names: column -> its fields (struct / JSON object) or None
Tree = dict[str, "Tree | None"]


def _has_column(tree: Tree, column: str) -> bool:
    """Whether :func:`lookup` can reach ``column`` (a dotted path) in records of this schema."""
    node: Tree | None = tree
    for part in column.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _column_names(tree: Tree, prefix: str = "") -> list[str]:
    names = []
    for name, sub in tree.items():
        names.append(prefix + name)
        if sub:
            names += _column_names(sub, f"{prefix}{name}.")
    return sorted(names)


def _arrow_tree(fields) -> Tree:
    return {f.name: (_arrow_tree([f.type.field(i) for i in range(f.type.num_fields)])
                     if pa.types.is_struct(f.type) else None) for f in fields}


def _merge_record(tree: Tree, record: dict[str, Any]) -> None:
    for key, value in record.items():
        if isinstance(value, dict):
            if not isinstance(tree.get(key), dict):
                tree[key] = {}
            _merge_record(tree[key], value)
        else:
            tree.setdefault(key, None)


def _records_tree(records: list[Any]) -> Tree | None:
    tree: Tree = {}
    for record in records:
        if isinstance(record, dict):
            _merge_record(tree, record)
    return tree or None


def _json_document_schema(fs, path: str, group_column: str, sample_records: int = 100) -> Tree | None:
    """The columns of a ``format: json`` file's first records. A document cannot be read by its head,
    so the file is parsed whole (as the one task that reads it will be); raises
    :class:`JSONShapeError` when it is not a document of records."""
    with fs.open_input_stream(path, compression="detect") as f:
        data = f.read()
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise JSONShapeError(f"is not one JSON document ({exc})") from None
    return _records_tree(json_records(document, group_column)[:sample_records])


def _looks_like_document(head: str) -> bool:
    """A JSONL head without a record whose first line opens a JSON list, or is a lone ``{`` (an
    indented object): one JSON document, which JSONL would read as an error row per line."""
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    return first.startswith("[") or first == "{"


def input_schema(fs, path: str, fmt: str, sample_bytes: int = 1 << 16,
                 group_column: str = "group") -> Tree | None:
    """The columns of one input file, read from its head only: the Parquet footer, the CSV header
    (pyarrow.csv with the defaults Ray Data's reader uses), or the keys of the JSON records in the
    first ``sample_bytes``; a ``json`` document is read whole (:func:`_json_document_schema`).
    ``None`` when the JSONL head holds no record to learn from. Raises :class:`JSONShapeError` for a
    JSON document read as JSONL and for a ``json`` file that is not a document of records."""
    if fmt == "json":
        return _json_document_schema(fs, path, group_column)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return _arrow_tree(pq.read_schema(path, filesystem=fs))
    if fmt == "csv":
        import pyarrow.csv as pacsv

        with fs.open_input_stream(path, compression="detect") as f:
            return {name: None for name in pacsv.open_csv(f).schema.names}
    with fs.open_input_stream(path, compression="detect") as f:
        head = f.read(sample_bytes).decode("utf-8", errors="ignore")
    records = []
    for line in head.splitlines()[:-1] or head.splitlines():  # the last line may be cut
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    tree = _records_tree(records)
    if tree is None and _looks_like_document(head):
        raise JSONShapeError("holds one JSON document, not JSON Lines (one record per line): set format: json")
    return tree


def _first_file(fs, folder: str, fmt: str) -> str | None:
    """The file of ``folder`` that Ray Data reads first (its listing is sorted)."""
    import pyarrow.fs as pafs

    extensions = _FOLDER_EXTENSIONS[fmt]
    selector = pafs.FileSelector(folder, recursive=True)
    files = sorted(i.path for i in fs.get_file_info(selector)
                   if i.type == pafs.FileType.File
                   and not i.path[len(selector.base_dir):].lstrip("/").startswith(_SKIPPED_PREFIXES)
                   and (extensions is None or i.path.lower().endswith(extensions)))
    return files[0] if files else None


def _required_columns(config: IngestConfig) -> dict[str, str]:
    """Columns whose absence would turn every row of a file into an error or a drop -> the recipe
    setting that names them. Optional lineage columns (id, lang, response, ...) may be absent."""
    required = {} if config.prompt is not None else {config.columns.text: "columns.text"}
    if config.label is None and config.columns.label:  # a fixed `label` wins over the column
        required.setdefault(config.columns.label, "columns.label")
    if config.micro_map:
        required.setdefault(config.columns.micro, "columns.micro")
    if config.require_response:
        required.setdefault(config.columns.response, "columns.response")
    for column in config.keep:
        required.setdefault(column, "keep")
    return required


def check_columns(config: IngestConfig, key: str = "stages.ingest") -> None:
    """Fail fast, in the driver before any cluster work, when an input lacks a column the mapping
    needs (:func:`_required_columns`); one line naming the recipe key, the file and the column.

    Each path is checked on its head only; a folder on its first file (as Ray Data lists it). A
    whole-file property cannot be checked per batch (a batch may hold only broken lines), so the
    workers do not check: rows of other files that lack a column end as error rows
    (``missing_text``, ``unknown_label``) or ``filtered_out``, like any row without the value.
    """
    import pyarrow.fs as pafs

    from pipelines.core.config import is_uri

    for entry in config.paths:
        fs, path = (pafs.FileSystem.from_uri(entry) if is_uri(entry)
                    else (pafs.LocalFileSystem(), str(Path(entry).resolve())))
        where = f"input {entry}"
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            first = _first_file(fs, path, config.format)
            if first is None:
                raise ConfigError(f"{key}.paths: folder {entry} has no {config.format} files")
            shown = f"{entry.split('://')[0]}://{first}" if is_uri(entry) else first  # fs paths drop the scheme
            where = f"input {shown} (the first file of {entry})"
            path = first
        try:
            tree = input_schema(fs, path, config.format, group_column=config.group_column)
        except JSONShapeError as exc:
            raise InputFormatError(f"{key}.format: {where} {exc}") from None
        if tree is None:
            continue
        for column, setting in _required_columns(config).items():
            if not _has_column(tree, column):
                raise MissingColumnError(f"{key}.{setting}: {where} has no column {column!r} "
                                         f"(columns: {_listing(_column_names(tree))})")


def _listing(names: list[str], limit: int = 40) -> str:
    return str(names) if len(names) <= limit else f"{names[:limit]} and {len(names) - limit} more"


def table_batch_to_rows(batch: pa.Table, *, config: IngestConfig,
                        micro_macros: Mapping[str, str] | None = None) -> pa.Table:
    origins = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * batch.num_rows
    records = batch.drop_columns(["path"]).to_pylist() if "path" in batch.column_names else batch.to_pylist()
    return to_table([record_to_row(r, config, o, micro_macros) for r, o in zip(records, origins)], ORIGIN)


def read_corpus(config: IngestConfig, micro_macros: Mapping[str, str] | None = None):
    """The lazy Ray Dataset of rows for ``config`` (row schema + status + ``origin``);
    ``micro_macros``: :func:`category_codes` of the config."""
    import ray

    kwargs = {"config": config, "micro_macros": micro_macros}
    if config.format == "jsonl":
        ds = ray.data.read_text(config.paths, include_paths=True, drop_empty_lines=True)
        return ds.map_batches(parse_jsonl_batch, batch_format="pyarrow", fn_kwargs=kwargs)
    if config.format == "json":  # one document per file, parsed whole: one file per batch
        ds = ray.data.read_binary_files(config.paths, include_paths=True)
        return ds.map_batches(parse_json_batch, batch_format="pyarrow", batch_size=1, fn_kwargs=kwargs)
    reader = ray.data.read_parquet if config.format == "parquet" else ray.data.read_csv
    ds = reader(config.paths, include_paths=True)
    return ds.map_batches(table_batch_to_rows, batch_format="pyarrow", fn_kwargs=kwargs)


def written_columns(config: IngestConfig) -> frozenset[str]:
    """The columns an ingestion's ok rows have values in (its column contract): the row schema's
    identity fields, ``origin``, and what the mapping fills - a ``label`` from ``label`` or
    ``columns.label``, a ``macro`` from ``columns.macro`` or a mapped micro, ``lang`` from ``lang`` or
    ``columns.lang``, ``split`` from ``split`` or ``columns.split``, and the kept columns (``response``,
    ``harm_category``, ``harm_level``). The Parquet files hold every schema and :data:`ORIGIN` column;
    an unmapped one is empty, and no stage can read it."""
    columns = config.columns
    filled = {field for name, field in _KEPT.items() if getattr(columns, name)}
    filled |= {"label"} if config.label or columns.label else set()
    filled |= {"macro"} if config.micro_map else set()
    filled |= {"lang"} if config.lang else set()
    filled |= {"split"} if config.split else set()
    return frozenset({"id", "text", "source", "method", "parent_id", "iteration", "origin"} | filled)


def _recipe_key(name: str) -> str:
    return "stages.ingest" if name == "ingest" else f"stages.seeds.{name.removeprefix('seeds_')}"


class IngestStage(Stage):
    """The corpus (``ingest``) or one labelled seed dataset (``seeds_<key>``). ``taxonomy``: the
    recipe's, whose codes ``macro_map`` / ``micro_map`` must name and which gives a mapped micro
    its macro."""

    name = "ingest"

    def __init__(self, config: IngestConfig, name: str = "ingest", taxonomy: str | Path = DEFAULT_TAXONOMY):
        super().__init__(config, name=name)
        # stages are built before Ray starts: a mapping the input cannot satisfy fails here
        self.micro_macros = category_codes(config, taxonomy, _recipe_key(name))
        check_columns(config, _recipe_key(name))
        self.writes = written_columns(config)

    def source_fingerprint(self) -> str:
        return source_fingerprint(self.config.paths)

    def build(self, inputs: dict) -> Any:
        return read_corpus(self.config, self.micro_macros)


def _check_ingest(config: IngestConfig, refs: References) -> dict[str, str | None]:
    category_codes(config, refs.recipe.taxonomy, "stages.ingest")
    return {}


def _check_seeds(seeds: dict[str, IngestConfig], refs: References) -> dict[str, str | None]:
    for key, config in seeds.items():
        category_codes(config, refs.recipe.taxonomy, f"stages.seeds.{key}")
    return {}


register("ingest", config=IngestConfig, provides="rows", check=_check_ingest,
         build=lambda recipe, config: [IngestStage(config, taxonomy=recipe.taxonomy)])
register("seeds", config=IngestConfig, keyed=True, provides="rows", check=_check_seeds,
         build=lambda recipe, seeds: [IngestStage(config, name=f"seeds_{key}", taxonomy=recipe.taxonomy)
                                      for key, config in seeds.items()],
         description="labelled seed datasets; each is stage seeds_<key>")
