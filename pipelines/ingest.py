"""Corpus ingestion: stream JSONL / Parquet / CSV (files or folders, local or cloud URIs) into rows.

JSONL is read as text lines and parsed per row, so a malformed line becomes an ``error`` row
(``invalid_json``) instead of failing the read. Rows whose text is missing, not a string, or empty go
to ``error`` with a reason. Text is normalised (Unicode form, control characters, whitespace runs). The corpus is never materialised in the driver: this is a lazy Ray
Dataset that the runner streams to Parquet.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipelines.config import ColumnMap, IngestConfig
from pipelines.rows import ERROR, content_id, error_detail, make_row, to_table
from pipelines.rundir import source_fingerprint
from pipelines.textnorm import normalize_text
from pipelines.stage import Stage

ORIGIN = {"origin": pa.string()}  # the file a row came from


class MissingColumnError(ValueError):
    pass


def record_to_row(record: Any, columns: ColumnMap, *, source: str, min_chars: int, origin: str,
                  normalize: str = "nfc") -> dict[str, Any]:
    """One input record (dict) -> one row with normalised text; problems become an error row with a
    reason (``not_an_object``, ``missing_text``, ``non_text``, ``empty_text``)."""
    if not isinstance(record, dict):
        return make_row(id=content_id(repr(record)), source=source, method="ingest", origin=origin,
                        status=ERROR, reason="not_an_object", detail=error_detail(record))
    raw_id = record.get(columns.id) if columns.id else None
    text = record.get(columns.text)
    fields: dict[str, Any] = {"source": source, "method": "ingest", "origin": origin}
    for name in ("lang", "label", "macro", "micro"):
        column = getattr(columns, name)
        if column and record.get(column) is not None:
            fields[name] = str(record[column])
    if text is None:
        reason = "missing_text"
    elif not isinstance(text, str):
        reason = "non_text"
    elif len(text := normalize_text(text, normalize)) < min_chars:
        reason = "empty_text"
    else:
        return make_row(id=str(raw_id) if raw_id not in (None, "") else content_id(text), text=text,
                        **fields)
    return make_row(id=str(raw_id) if raw_id not in (None, "") else content_id(repr(record)),
                    status=ERROR, reason=reason, detail=error_detail(record), **fields)


def _check_text_column(keys_seen: set[str], columns: ColumnMap, origin: str) -> None:
    if columns.text not in keys_seen:
        raise MissingColumnError(
            f"ingest: input {origin} has no column {columns.text!r} (columns: {sorted(keys_seen)}); "
            "set stages.ingest.columns.text to the column that holds the text")


def parse_jsonl_batch(batch: pa.Table, *, columns: ColumnMap, source: str, min_chars: int,
                      normalize: str) -> pa.Table:
    rows, keys_seen = [], set()
    for line, origin in zip(batch.column("text").to_pylist(), batch.column("path").to_pylist()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(make_row(id=content_id(line), source=source, method="ingest", origin=origin,
                                 status=ERROR, reason="invalid_json",
                                 detail=error_detail(f"{exc}: {line}")))
            continue
        if isinstance(record, dict):
            keys_seen.update(record)
        rows.append(record_to_row(record, columns, source=source, min_chars=min_chars, origin=origin,
                                  normalize=normalize))
    if keys_seen:
        _check_text_column(keys_seen, columns, str(batch.column("path")[0]))
    return to_table(rows, ORIGIN)


def table_batch_to_rows(batch: pa.Table, *, columns: ColumnMap, source: str, min_chars: int,
                        normalize: str) -> pa.Table:
    origins = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * batch.num_rows
    _check_text_column(set(batch.column_names), columns, origins[0] if origins else "")
    records = batch.drop_columns(["path"]).to_pylist() if "path" in batch.column_names else batch.to_pylist()
    return to_table([record_to_row(r, columns, source=source, min_chars=min_chars, origin=o,
                                   normalize=normalize) for r, o in zip(records, origins)], ORIGIN)


def read_corpus(config: IngestConfig):
    """The lazy Ray Dataset of rows for ``config`` (row schema + status + ``origin``)."""
    import ray

    kwargs = dict(columns=config.columns, source=config.source, min_chars=config.min_chars,
                  normalize=config.normalize)
    if config.format == "jsonl":
        ds = ray.data.read_text(config.paths, include_paths=True, drop_empty_lines=True)
        return ds.map_batches(parse_jsonl_batch, batch_format="pyarrow", fn_kwargs=kwargs)
    reader = ray.data.read_parquet if config.format == "parquet" else ray.data.read_csv
    ds = reader(config.paths, include_paths=True)
    return ds.map_batches(table_batch_to_rows, batch_format="pyarrow", fn_kwargs=kwargs)


class IngestStage(Stage):
    name = "ingest"

    def source_fingerprint(self) -> str:
        return source_fingerprint(self.config.paths)

    def build(self, inputs: dict) -> Any:
        return read_corpus(self.config)
