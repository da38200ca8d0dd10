"""The row schema every stage reads and writes.

One sample is one row. Fields of the schema are always present and never null (unknown text fields are
``""``), so Parquet files written by different blocks share one schema. Stages may add lineage
columns (``model``, ``raw_output``, ...). While a stage runs, each row also carries

- ``status``: ``ok`` (goes downstream), ``dropped`` (filtered on purpose) or ``error`` (failed);
- ``reason``: a short machine-readable code for dropped/error rows (``""`` for ok rows);
- ``detail``: a human-readable explanation (the exception, the unparseable answer, ...).

The run directory stores each status in its own partition, so nothing disappears silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

SCHEMA_FIELDS: dict[str, pa.DataType] = {
    "id": pa.string(),         # stable content hash
    "text": pa.string(),
    "lang": pa.string(),       # ISO code, "" until language ID ran
    "label": pa.string(),      # "safe" / "unsafe" / "" (unknown)
    "macro": pa.string(),      # A..E or ""
    "micro": pa.string(),      # A1..E2 or ""
    "source": pa.string(),     # rag / real / pe / external / gen / corpus
    "method": pa.string(),     # how the row was made (rewriting method, loader, ...)
    "parent_id": pa.string(),  # what it was derived from ("" for originals)
    "iteration": pa.int32(),   # generator-classifier loop iteration
}
STATUS_FIELDS: dict[str, pa.DataType] = {
    "status": pa.string(),
    "reason": pa.string(),
    "detail": pa.string(),
}
OK, DROPPED, ERROR = "ok", "dropped", "error"
STATUSES = (OK, DROPPED, ERROR)


def content_id(text: str, *salt: str) -> str:
    """Stable 16-hex id: sha1 over the text and optional lineage salt (e.g. the parent id)."""
    h = hashlib.sha1(text.encode("utf-8"))
    for s in salt:
        h.update(b"\x00" + s.encode("utf-8"))
    return h.hexdigest()[:16]


def make_row(**fields: Any) -> dict[str, Any]:
    """A row with every schema and status field present (defaults: "" / 0 / ok)."""
    row: dict[str, Any] = {name: "" for name in SCHEMA_FIELDS}
    row["iteration"] = 0
    row.update(status=OK, reason="", detail="")
    row.update(fields)
    return row


def to_table(rows: Iterable[dict[str, Any]], extra: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Rows -> Arrow table with the fixed schema (schema + status + ``extra`` lineage columns).

    Giving every batch the same types keeps Parquet files of one stage mergeable (no ``null``-typed
    column in one file and ``string`` in another).
    """
    fields = {**SCHEMA_FIELDS, **(extra or {}), **STATUS_FIELDS}
    rows = list(rows)
    columns = {}
    for name, typ in fields.items():
        if pa.types.is_integer(typ) or pa.types.is_floating(typ):
            default = 0
        elif pa.types.is_list(typ):
            default = []
        elif pa.types.is_boolean(typ):
            default = False
        else:
            default = ""
        values = [row.get(name, default) for row in rows]
        if pa.types.is_string(typ):
            values = ["" if v is None else str(v) for v in values]
        elif pa.types.is_list(typ):
            values = [[] if v is None else list(v) for v in values]
        columns[name] = pa.array(values, type=typ)
    return pa.table(columns)


def error_detail(value: Any, limit: int = 500) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def keyed_rng(seed: int, *keys: str):
    """A numpy Generator determined by the run seed and string keys (a category, a row id), so a
    sample does not depend on partitioning, ordering or which worker draws it."""
    import numpy as np

    digest = hashlib.sha256("\x00".join([str(seed), *keys]).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array):
    """A ``fixed_size_list<T>[n]`` column -> ``(rows, n)`` numpy array of T, without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)


#: the two labels of the row schema (``label``)
SAFE, UNSAFE = "safe", "unsafe"
#: a merged stage's column holding an upstream stage's lineage columns as one JSON object
DUPLICATE_OF = "duplicate_of"
LINEAGE = "lineage"
#: the columns of the common schema (:func:`to_common_schema`): the row schema and the JSON ``lineage``.
#: A stage whose ok rows are these plus its own says so in its column contract
#: (``writes = COMMON_COLUMNS | {...}``, :mod:`pipelines.core.contracts`)
COMMON_COLUMNS = frozenset(SCHEMA_FIELDS) | {LINEAGE}


def to_common_schema(batch: pa.Table) -> pa.Table:
    """Row-schema columns as they are; every other column (the stage-specific lineage: ``model``,
    ``query``, ``retrieved_ids``, ``origin`` ...) folded into one JSON ``lineage`` column, merged
    into an existing one. Status columns are reset by the next stage."""
    extra = [c for c in batch.column_names
             if c not in SCHEMA_FIELDS and c not in STATUS_FIELDS and c not in (LINEAGE, DUPLICATE_OF)]
    if extra or LINEAGE not in batch.column_names:
        previous = (batch.column(LINEAGE).to_pylist() if LINEAGE in batch.column_names
                    else [""] * batch.num_rows)
        records = batch.select(extra).to_pylist() if extra else [{}] * batch.num_rows
        merged = [json.dumps({**(json.loads(p) if p else {}), **r}, ensure_ascii=False, default=str)
                  for p, r in zip(previous, records)]
        batch = batch.drop_columns(extra + ([LINEAGE] if LINEAGE in batch.column_names else []))
        batch = batch.append_column(LINEAGE, pa.array(merged, pa.string()))
    keep = [c for c in SCHEMA_FIELDS] + [LINEAGE]
    return batch.select(keep).cast(pa.schema({**SCHEMA_FIELDS, LINEAGE: pa.string()}))


def column_or_lineage(row: dict[str, Any], name: str) -> Any:
    """``row[name]`` when the row has that column with a value, else what its JSON lineage kept
    under ``name`` (merged stages fold their extra fields there, e.g. a seed loader's ``response``)."""
    if row.get(name):
        return row[name]
    return json.loads(row.get(LINEAGE) or "{}").get(name)


def union_all(datasets: list):
    """One dataset of several (Ray's ``union`` takes the others as arguments)."""
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def common_rows(inputs: dict, names) -> Any:
    """The named upstream outputs as one dataset in the common schema (row schema + ``lineage``),
    so that sources with different lineage columns can be merged and written together."""
    return union_all([inputs[name].map_batches(to_common_schema, batch_format="pyarrow") for name in names])


#: rows per hash-shuffle partition of a ``groupby`` (see :func:`shuffle_partitions`)
ROWS_PER_PARTITION = 2000


def shuffle_partitions(rows: int, rows_per_partition: int = ROWS_PER_PARTITION, most: int = 200) -> int:
    """Partitions for a ``groupby`` over ``rows`` rows: Ray Data's default (200) costs a task per
    partition, which dominates small runs; large ones keep partitions of ``rows_per_partition`` rows,
    at most ``most`` (no more than the groups there can be)."""
    return max(1, min(most, -(-rows // rows_per_partition)))
