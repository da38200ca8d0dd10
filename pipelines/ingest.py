"""Corpus ingestion: stream JSONL / Parquet / CSV (files or folders, local or cloud URIs) into rows.

JSONL is read as text lines and parsed per row, so a malformed line becomes an ``error`` row
(``invalid_json``) instead of failing the read. Rows whose text is missing, not a string, or empty go
to ``error`` with a reason. Text is normalised (Unicode form, control characters, whitespace runs). The corpus is never materialised in the driver: this is a lazy Ray
Dataset that the runner streams to Parquet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.config import ColumnMap, IngestConfig
from pipelines.rows import DROPPED, ERROR, content_id, error_detail, make_row, to_table
from pipelines.rundir import source_fingerprint
from pipelines.textnorm import normalize_text
from pipelines.stage import Stage

# source file; paired response; the dataset's own harm category and level (SHARD stratifies by level)
ORIGIN = {"origin": pa.string(), "response": pa.string(), "harm_category": pa.string(),
          "harm_level": pa.string()}
#: ColumnMap field -> row column, for the fields kept as they are
_KEPT = {"lang": "lang", "macro": "macro", "micro": "micro", "response": "response",
         "category": "harm_category", "level": "harm_level"}


class MissingColumnError(ValueError):
    pass


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


def _check_text_column(keys_seen: set[str], columns: ColumnMap, origin: str) -> None:
    if columns.text.split(".")[0] not in keys_seen:
        raise MissingColumnError(
            f"ingest: input {origin} has no column {columns.text!r} (columns: {sorted(keys_seen)}); "
            "set stages.ingest.columns.text to the column that holds the text")


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


def check_jsonl_mapping(config: IngestConfig, sample_bytes: int = 1 << 16) -> None:
    """Fail fast, before any cluster work, when the first input file's records lack the text column.

    A whole-file property cannot be checked per batch (a batch may hold only broken lines, whose
    rows are ``missing_text`` errors), so the driver reads the head of the first file once.
    """
    import pyarrow.fs as pafs

    from pipelines.config import is_uri

    first = config.paths[0]
    fs, path = (pafs.FileSystem.from_uri(first) if is_uri(first)
                else (pafs.LocalFileSystem(), str(Path(first).resolve())))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                       if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))
        if not files:
            return
        path = files[0]
    with fs.open_input_stream(path) as f:
        head = f.read(sample_bytes).decode("utf-8", errors="ignore")
    keys: set[str] = set()
    for line in head.splitlines()[:-1] or head.splitlines():  # the last line may be cut
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            keys.update(record)
    if keys:
        _check_text_column(keys, config.columns, path)


def table_batch_to_rows(batch: pa.Table, *, config: IngestConfig) -> pa.Table:
    origins = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * batch.num_rows
    _check_text_column(set(batch.column_names), config.columns, origins[0] if origins else "")
    records = batch.drop_columns(["path"]).to_pylist() if "path" in batch.column_names else batch.to_pylist()
    return to_table([record_to_row(r, config, o) for r, o in zip(records, origins)], ORIGIN)


def read_corpus(config: IngestConfig):
    """The lazy Ray Dataset of rows for ``config`` (row schema + status + ``origin``)."""
    import ray

    kwargs = {"config": config}
    if config.format == "jsonl":
        check_jsonl_mapping(config)
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

    def source_fingerprint(self) -> str:
        return source_fingerprint(self.config.paths)

    def build(self, inputs: dict) -> Any:
        return read_corpus(self.config)
