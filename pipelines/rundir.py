"""The run directory: one folder per stage, each with Parquet partitions and a manifest.

Layout (``RUN_DIR`` is a local path or a cloud URI such as ``s3://bucket/runs/x``)::

    RUN_DIR/recipe.yaml                  the resolved recipe of the last run
    RUN_DIR/<stage>/status=ok/*.parquet  rows that go downstream
    RUN_DIR/<stage>/status=dropped/...   rows filtered on purpose, with reason
    RUN_DIR/<stage>/status=error/...     rows that failed, with reason and detail
    RUN_DIR/<stage>/manifest.json        counts, config hash, input fingerprint, timings

A manifest is written last, so a stage folder without one is an interrupted stage and is redone.
All file access goes through pyarrow filesystems, which is what Ray Data uses for the same URIs.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.config import is_uri

MANIFEST = "manifest.json"


class RunDir:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        if is_uri(self.root):
            self.fs, self._base = pafs.FileSystem.from_uri(self.root)
        else:
            self.fs, self._base = pafs.LocalFileSystem(), self.root
        self.fs.create_dir(self._base, recursive=True)

    # Paths: `uri` for Ray Data (it resolves the filesystem itself), `_fs_path` for pyarrow.
    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _fs_path(self, *parts: str) -> str:
        return "/".join([self._base, *parts])

    def partition_uri(self, stage: str, status: str) -> str:
        return self.uri(stage, f"status={status}")

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self._fs_path(*parts)).type != pafs.FileType.NotFound

    # Text files -------------------------------------------------------------------------------
    def write_text(self, relpath: str, text: str) -> None:
        path = self._fs_path(relpath)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))

    def read_text(self, relpath: str) -> str | None:
        if not self.exists(relpath):
            return None
        with self.fs.open_input_stream(self._fs_path(relpath)) as f:
            return f.read().decode("utf-8")

    # Manifests --------------------------------------------------------------------------------
    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        text = self.read_text(f"{stage}/{MANIFEST}")
        return json.loads(text) if text else None

    def write_manifest(self, stage: str, manifest: dict[str, Any]) -> None:
        self.write_text(f"{stage}/{MANIFEST}", json.dumps(manifest, indent=2, ensure_ascii=False))

    def manifests(self) -> dict[str, dict[str, Any]]:
        """Every stage folder's manifest (``None`` for an interrupted stage), by folder name
        (``_work`` and other ``_`` folders are scratch space, not stages)."""
        out: dict[str, Any] = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self._base)):
            if info.type == pafs.FileType.Directory and not info.base_name.startswith("_"):
                out[info.base_name] = self.read_manifest(info.base_name)
        return out

    def clear_stage(self, stage: str) -> None:
        if self.exists(stage):
            self.fs.delete_dir(self._fs_path(stage))

    # Parquet outputs --------------------------------------------------------------------------
    def parquet_files(self, stage: str, status: str) -> list[pafs.FileInfo]:
        path = self._fs_path(stage, f"status={status}")
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted((i for i in infos if i.path.endswith(".parquet")), key=lambda i: i.path)

    def list_parquet(self, relpath: str) -> list[str]:
        """Parquet files under a folder of the run directory (none if it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._fs_path(relpath), recursive=True,
                                                        allow_not_found=True))
        return sorted(i.path for i in infos if i.path.endswith(".parquet"))

    def count_rows(self, stage: str, status: str) -> int:
        """Row count from Parquet footers: no data is read."""
        total = 0
        for info in self.parquet_files(stage, status):
            with self.fs.open_input_file(info.path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def column_values(self, stage: str, status: str, column: str) -> list[Any]:
        """One column of a partition (used for reason counts and lineage checks, never texts)."""
        values: list[Any] = []
        for info in self.parquet_files(stage, status):
            with self.fs.open_input_file(info.path) as f:
                values.extend(pq.read_table(f, columns=[column]).column(column).to_pylist())
        return values

    def reason_counts(self, stage: str, status: str) -> dict[str, int]:
        return dict(Counter(self.column_values(stage, status, "reason")))

    def output_fingerprint(self, stage: str) -> str:
        """Identifies a stage's outputs: names and sizes of its files (partitions and artifacts
        such as an index), the manifest excepted."""
        h = hashlib.sha256()
        infos = self.fs.get_file_info(pafs.FileSelector(self._fs_path(stage), recursive=True,
                                                        allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            if info.type == pafs.FileType.File and info.base_name != MANIFEST:
                h.update(f"{info.path}:{info.size}\n".encode())
        return h.hexdigest()[:16]

    # Binary artifacts -------------------------------------------------------------------------
    def write_bytes(self, relpath: str, data: bytes) -> None:
        path = self._fs_path(relpath)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def read_bytes(self, relpath: str) -> bytes:
        if not self.exists(relpath):
            raise FileNotFoundError(f"{self.uri(relpath)} does not exist")
        with self.fs.open_input_stream(self._fs_path(relpath)) as f:
            return f.read()

    def write_table(self, stage: str, status: str, table, name: str = "part-00000.parquet") -> None:
        """Write one Arrow table as a file of a stage's status partition."""
        path = self._fs_path(stage, f"status={status}", name)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=self.fs)

    def iter_batches(self, stage: str, status: str, columns: list[str], batch_size: int = 65536):
        """Stream columns of a partition as Arrow record batches (the driver never holds it all)."""
        for info in self.parquet_files(stage, status):
            with self.fs.open_input_file(info.path) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def source_fingerprint(paths: list[str]) -> str:
    """Identifies external input files by path, size and modification time (no content read).

    Folders are expanded recursively, so a file added to a corpus folder changes the fingerprint.
    """
    h = hashlib.sha256()
    for path in paths:
        if is_uri(path):
            fs, base = pafs.FileSystem.from_uri(path)
        else:
            fs, base = pafs.LocalFileSystem(), path
        info = fs.get_file_info(base)
        infos = ([i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                  if i.type == pafs.FileType.File]
                 if info.type == pafs.FileType.Directory else [info])
        for i in sorted(infos, key=lambda i: i.path):
            h.update(f"{i.path}:{i.size}:{i.mtime_ns}\n".encode())
    return h.hexdigest()[:16]
