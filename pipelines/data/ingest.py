"""Corpus ingestion: stream JSONL / Parquet / CSV (files or folders, local or cloud URIs) into rows.

JSONL is read as text lines and parsed per row, so a malformed line becomes an ``error`` row
(``invalid_json``) instead of failing the read. Rows whose text is missing, not a string, or empty go
to ``error`` with a reason. Text is normalised (Unicode form, control characters, whitespace runs). The corpus is never materialised in the driver: this is a lazy Ray
Dataset that the runner streams to Parquet. The mapping is checked against each input's head in the
driver when the stage is built (:func:`check_columns`), before Ray starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pipelines.core.config import ADDED, ConfigError, ExistingPath, Strict
from pipelines.core.registry import register
from pipelines.core.rows import DROPPED, ERROR, content_id, error_detail, make_row, to_table
from pipelines.core.rundir import source_fingerprint
from pipelines.core.stage import Stage
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

# source file; paired response; the dataset's own harm category and level (SHARD stratifies by level)
ORIGIN = {"origin": pa.string(), "response": pa.string(), "harm_category": pa.string(),
          "harm_level": pa.string(), "split": pa.string()}
#: ColumnMap field -> row column, for the fields kept as they are
_KEPT = {"lang": "lang", "macro": "macro", "micro": "micro", "response": "response",
         "category": "harm_category", "level": "harm_level", "split": "split"}


class MissingColumnError(ConfigError):
    """An input lacks a column the mapping names (a recipe problem: ``chillguard run`` prints it
    as one line)."""


def lookup(record: dict[str, Any], column: str) -> Any:
    """``record[column]``, where ``column`` may be a dotted path into nested objects."""
    value: Any = record
    for part in column.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def record_to_row(record: Any, config: IngestConfig, origin: str) -> dict[str, Any]:
    """One input record (dict) -> one row with normalised text and mapped label/macro.

    Problems become an error row with a reason (``not_an_object``, ``missing_text``, ``non_text``,
    ``empty_text``, ``unknown_label``); rows outside ``keep`` are dropped (``filtered_out``).
    """
    columns = config.columns
    if not isinstance(record, dict):
        return make_row(id=content_id(repr(record)), source=config.source, method="ingest",
                        origin=origin, status=ERROR, reason="not_an_object", detail=error_detail(record))
    raw_id = lookup(record, columns.id) if columns.id else None
    text = lookup(record, columns.text)
    fields: dict[str, Any] = {"source": config.source, "method": config.preset or "ingest",
                              "origin": origin}
    for name, field in _KEPT.items():
        column = getattr(columns, name)
        if column and lookup(record, column) is not None:
            fields[field] = str(lookup(record, column))
    if config.lang:
        fields["lang"] = config.lang
    if config.macro_map:
        fields["macro"] = config.macro_map.get(fields.get("macro", ""), "")
    problem = None
    if config.label:
        fields["label"] = config.label
    elif columns.label:
        raw = lookup(record, columns.label)
        mapping = config.label_map or {"safe": "safe", "unsafe": "unsafe"}
        if str(raw) in mapping:
            fields["label"] = mapping[str(raw)]
        else:
            problem = ("unknown_label", f"label {raw!r} is not one of {sorted(mapping)}")
    for column, allowed in config.keep.items():
        if str(lookup(record, column)) not in allowed:
            return make_row(id=str(raw_id) if raw_id not in (None, "") else content_id(repr(record)),
                            status=DROPPED, reason="filtered_out",
                            detail=f"{column}={lookup(record, column)!r} not in {allowed}", **fields)
    if text is None:
        problem = ("missing_text", error_detail(record))
    elif not isinstance(text, str):
        problem = ("non_text", error_detail(record))
    elif len(text := normalize_text(text, config.normalize)) < config.min_chars:
        problem = ("empty_text", error_detail(record))
    if problem is None:
        return make_row(id=str(raw_id) if raw_id not in (None, "") else content_id(text), text=text,
                        **fields)
    key = text if isinstance(text, str) and text else repr(record)
    return make_row(id=str(raw_id) if raw_id not in (None, "") else content_id(key),
                    status=ERROR, reason=problem[0], detail=problem[1], **fields)


def parse_jsonl_batch(batch: pa.Table, *, config: IngestConfig) -> pa.Table:
    rows = []
    for line, origin in zip(batch.column("text").to_pylist(), batch.column("path").to_pylist()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(make_row(id=content_id(line), source=config.source, method="ingest", origin=origin,
                                 status=ERROR, reason="invalid_json",
                                 detail=error_detail(f"{exc}: {line}")))
            continue
        rows.append(record_to_row(record, config, origin))
    return to_table(rows, ORIGIN)


#: names Ray Data's folder listing skips (relative path prefixes), and the extensions its Parquet
#: and CSV readers take from a folder (``ray.data.read_parquet`` / ``read_csv``); JSONL folders are
#: read with ``read_text``, which takes every file
_SKIPPED_PREFIXES = (".", "_")
_FOLDER_EXTENSIONS = {"jsonl": None, "parquet": (".parquet",),
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


def input_schema(fs, path: str, fmt: str, sample_bytes: int = 1 << 16) -> Tree | None:
    """The columns of one input file, read from its head only: the Parquet footer, the CSV header
    (pyarrow.csv with the defaults Ray Data's reader uses), or the keys of the JSON records in the
    first ``sample_bytes``. ``None`` when the JSONL head holds no record to learn from."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return _arrow_tree(pq.read_schema(path, filesystem=fs))
    if fmt == "csv":
        import pyarrow.csv as pacsv

        with fs.open_input_stream(path, compression="detect") as f:
            return {name: None for name in pacsv.open_csv(f).schema.names}
    with fs.open_input_stream(path, compression="detect") as f:
        head = f.read(sample_bytes).decode("utf-8", errors="ignore")
    tree: Tree = {}
    for line in head.splitlines()[:-1] or head.splitlines():  # the last line may be cut
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            _merge_record(tree, record)
    return tree or None


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
    required = {config.columns.text: "columns.text"}
    if config.label is None and config.columns.label:  # a fixed `label` wins over the column
        required.setdefault(config.columns.label, "columns.label")
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
        tree = input_schema(fs, path, config.format)
        if tree is None:
            continue
        for column, setting in _required_columns(config).items():
            if not _has_column(tree, column):
                raise MissingColumnError(f"{key}.{setting}: {where} has no column {column!r} "
                                         f"(columns: {_listing(_column_names(tree))})")


def _listing(names: list[str], limit: int = 40) -> str:
    return str(names) if len(names) <= limit else f"{names[:limit]} and {len(names) - limit} more"


def table_batch_to_rows(batch: pa.Table, *, config: IngestConfig) -> pa.Table:
    origins = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * batch.num_rows
    records = batch.drop_columns(["path"]).to_pylist() if "path" in batch.column_names else batch.to_pylist()
    return to_table([record_to_row(r, config, o) for r, o in zip(records, origins)], ORIGIN)


def read_corpus(config: IngestConfig):
    """The lazy Ray Dataset of rows for ``config`` (row schema + status + ``origin``)."""
    import ray

    kwargs = {"config": config}
    if config.format == "jsonl":
        ds = ray.data.read_text(config.paths, include_paths=True, drop_empty_lines=True)
        return ds.map_batches(parse_jsonl_batch, batch_format="pyarrow", fn_kwargs=kwargs)
    reader = ray.data.read_parquet if config.format == "parquet" else ray.data.read_csv
    ds = reader(config.paths, include_paths=True)
    return ds.map_batches(table_batch_to_rows, batch_format="pyarrow", fn_kwargs=kwargs)


class IngestStage(Stage):
    """The corpus (``ingest``) or one labelled seed dataset (``seeds_<key>``)."""

    name = "ingest"

    def __init__(self, config: IngestConfig, name: str = "ingest"):
        super().__init__(config)
        self.name = name
        # stages are built before Ray starts: a mapping the input cannot satisfy fails here
        check_columns(config, "stages.ingest" if name == "ingest"
                      else f"stages.seeds.{name.removeprefix('seeds_')}")

    def source_fingerprint(self) -> str:
        return source_fingerprint(self.config.paths)

    def build(self, inputs: dict) -> Any:
        return read_corpus(self.config)


register("ingest", config=IngestConfig, after="keywords", provides="rows",
         build=lambda recipe, config: [IngestStage(config)])
register("seeds", config=IngestConfig, keyed=True, after="ingest", provides="rows",
         build=lambda recipe, seeds: [IngestStage(config, name=f"seeds_{key}") for key, config in seeds.items()],
         description="labelled seed datasets; each is stage seeds_<key>")
