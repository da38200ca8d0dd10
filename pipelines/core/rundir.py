"""The run directory: one folder per stage, each with Parquet partitions and a manifest.

Layout (``RUN_DIR`` is a local path or a cloud URI such as ``s3://bucket/runs/x``)::

    RUN_DIR/recipe.yaml                  the resolved recipe of the last run
    RUN_DIR/<stage>/status=ok/*.parquet  rows that go downstream
    RUN_DIR/<stage>/status=dropped/...   rows filtered on purpose, with reason
    RUN_DIR/<stage>/status=error/...     rows that failed, with reason and detail
    RUN_DIR/<stage>/manifest.json        counts, config hash, input fingerprint, timings
    RUN_DIR/.lock                        who runs in it now (see :meth:`RunDir.lock`)

A manifest is written last, so a stage folder without one is an interrupted stage and is redone.
All file access goes through pyarrow filesystems, which is what Ray Data uses for the same URIs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.core.config import is_uri, portable
from pipelines.core.rows import STATUSES

MANIFEST = "manifest.json"
#: markers of the stages in progress (``_running/<stage>.json``)
RUNNING = "_running"
RECIPE = "recipe.yaml"
LOCK = ".lock"
#: files up to this size enter fingerprints with their whole content (parameters, small partitions,
#: demo inputs); larger ones as :func:`file_identity` says
SMALL_FILE_BYTES = 1 << 20
SAMPLE_BYTES = 64 << 10  # of a larger file's head and tail, see file_identity


class RunDirLocked(RuntimeError):
    """Another ``chillguard run`` holds the run directory."""


class NotARunDir(ValueError):
    """A path given as a run directory holds no run."""


MISSING_BUCKET = "bucket {bucket} does not exist (a run does not create buckets: create it first)"


class RunDirUnavailable(RuntimeError):
    """A run directory on object storage cannot be used: its bucket, credentials or endpoint."""


def storage_problem(uri: str, exc: OSError) -> str:
    """One line for a failed access to ``uri``: the likely cause, read from pyarrow's message (the
    AWS SDK's error names; a HEAD request has no body, so a refused key and a missing permission
    read the same)."""
    text = str(exc)
    bucket = uri.split("://", 1)[-1].split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not resolve" in text:
        cause = (f"cannot reach the S3 endpoint {endpoint} (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL): "
                 "nothing answered" if endpoint else "cannot reach the S3 endpoint (network, proxy or DNS)")
    elif any(k in text for k in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "INVALID_ACCESS_KEY",
                                 "SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN")):
        cause = ("access denied: no or bad credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                 f"AWS_PROFILE or an instance profile), or no permission on bucket {bucket}")
    elif ("not found" in text and "Bucket" in text) or "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        cause = MISSING_BUCKET.format(bucket=bucket)
    else:
        cause = f"cannot be used: {text.splitlines()[0] if text else type(exc).__name__}"
    return f"run directory {uri}: {cause}"


class RunDir:
    def __init__(self, root: str, *, create: bool = True):
        """``create=False`` for readers (``chillguard status``): a mistyped path is not created."""
        self.root = root.rstrip("/")
        if is_uri(self.root):
            self.fs, self._base = pafs.FileSystem.from_uri(self.root)
        else:
            self.fs, self._base = pafs.LocalFileSystem(), os.path.abspath(self.root)
        if isinstance(self.fs, pafs.S3FileSystem):
            self._check_bucket()
        if create:
            try:
                self.fs.create_dir(self._base, recursive=True)
            except OSError as exc:
                if not is_uri(self.root):
                    raise
                raise RunDirUnavailable(storage_problem(self.root, exc)) from None

    def _check_bucket(self) -> None:
        """Raise :class:`RunDirUnavailable` with the likely cause unless the bucket exists and answers:
        one request, before anything else touches the store, so that a missing bucket, refused
        credentials or a dead endpoint are one line before Ray starts, not an SDK traceback (and
        the SDK's retries against a dead endpoint are paid once)."""
        bucket = self._base.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as exc:
            raise RunDirUnavailable(storage_problem(self.root, exc)) from None
        if info.type == pafs.FileType.NotFound:
            raise RunDirUnavailable(f"run directory {self.root}: {MISSING_BUCKET.format(bucket=bucket)}")

    @property
    def name(self) -> str:
        """The run's name in metrics and logs: the run directory's last path component."""
        return self.root.rsplit("/", 1)[-1]

    def check_is_run_dir(self) -> None:
        """Raise :class:`NotARunDir` unless the path holds a run: ``recipe.yaml`` (written when a
        run starts) or at least one stage manifest."""
        try:
            info = self.fs.get_file_info(self._base)
        except OSError as exc:
            if not is_uri(self.root):
                raise
            raise RunDirUnavailable(storage_problem(self.root, exc)) from None
        if info.type != pafs.FileType.Directory:
            raise NotARunDir(f"{self.root} does not exist")
        if not self.exists(RECIPE) and not any(m is not None for m in self.manifests().values()):
            raise NotARunDir(f"{self.root} is not a run directory (no {RECIPE} and no stage manifest)")

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

    # Stages in progress ------------------------------------------------------------------------
    def mark_running(self, stage: str, **details: Any) -> None:
        """Record that ``stage`` started (``_running/<stage>.json``: when, which host and pid, and
        ``details`` such as the run key that resuming an interrupted stage checks), for ``chillguard
        status`` while the run goes on; :meth:`clear_running` when it finishes."""
        self.write_text(f"{RUNNING}/{stage}.json", json.dumps(
            {"stage": stage, "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "host": socket.gethostname(), "pid": os.getpid(), **details}))

    def clear_running(self, stage: str) -> None:
        path = self._fs_path(RUNNING, f"{stage}.json")
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_file(path)

    def running(self) -> dict[str, dict[str, Any]]:
        """The stages marked running, with ``alive``: False when the marker's process is gone from this
        host (the run was killed: the stage is interrupted; on another host it cannot be told)."""
        out = {}
        for path in self.list_files(RUNNING, ".json"):
            marker = _parse(self.read_listed(path))
            if marker and marker.get("stage"):
                here = marker.get("host") == socket.gethostname()
                out[marker["stage"]] = {**marker, "alive": not here or _alive(marker.get("pid"))}
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
        return self.list_files(relpath, ".parquet")

    def read_listed(self, path: str) -> str:
        """The text of a file :meth:`list_files` listed."""
        with self.fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")

    def list_files(self, relpath: str, suffix: str) -> list[str]:
        """Files ending in ``suffix`` under a folder of the run directory (none if it does not exist),
        as paths of the run directory's file system (read them with :meth:`read_listed`)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._fs_path(relpath), recursive=True,
                                                        allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))

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

    def column_array(self, stage: str, status: str, column: str) -> pa.ChunkedArray:
        """One column of a partition as Arrow (ids for lineage checks: no Python objects)."""
        chunks = []
        for info in self.parquet_files(stage, status):
            with self.fs.open_input_file(info.path) as f:
                chunks.extend(pq.read_table(f, columns=[column]).column(column).chunks)
        return pa.chunked_array(chunks, pa.string()) if not chunks else pa.chunked_array(chunks)

    def output_schema(self, stage: str) -> pa.Schema | None:
        """The schema of a stage's row files (any status partition), ``None`` if it wrote none."""
        for status in STATUSES:
            files = self.parquet_files(stage, status)
            if files:
                with self.fs.open_input_file(files[0].path) as f:
                    return pq.read_schema(f)
        return None

    def reason_counts(self, stage: str, status: str) -> dict[str, int]:
        return dict(Counter(self.column_values(stage, status, "reason")))

    def output_fingerprint(self, stage: str) -> str:
        """Identifies a stage's outputs (partitions and artifacts such as an index), the manifest
        excepted: each file's path *inside the stage folder*, its size and its content (whole up to
        :data:`SMALL_FILE_BYTES`, head and tail beyond; :func:`file_identity`). Neither absolute
        paths nor mtimes enter it, so a run directory copied elsewhere (another disk, a bucket)
        resumes without recomputing; an artifact rewritten with the same size still counts as
        changed."""
        h = hashlib.sha256()
        base = self._fs_path(stage)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            if info.type == pafs.FileType.File and info.base_name != MANIFEST:
                h.update(file_identity(self.fs, info, info.path[len(base):].lstrip("/"), large="sample"))
        return h.hexdigest()[:16]

    # One run at a time ------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``RUN_DIR/.lock`` while a run writes, so two runs never interleave their stages.

        Local (and mounted shared) run directories use a kernel lock (``flock``) on the file, which the
        kernel releases when the process dies however it ends, so a crashed run never leaves a stale
        lock; the file keeps the holder's host, pid and start time for the message a second run
        prints. Cloud URIs have no such lock: the file is a marker created if absent and deleted at the
        end (:class:`MarkerLock`). That is best effort (check-then-write is not atomic on object
        stores) and a run killed without cleanup leaves the marker, which the next run reports with
        the holder and the command that clears it. The same process may take the lock again (the CLI
        takes it before connecting to Ray, ``run_recipe`` inside)."""
        key = self.uri(LOCK)
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        holder: FileLock | MarkerLock = (MarkerLock(self.fs, self._fs_path(LOCK), key) if is_uri(self.root)
                                         else FileLock(self._fs_path(LOCK), self.root))
        holder.acquire()
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            holder.release()

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

    def download(self, relpath: str, dest: str, suffix: str = "") -> list[str]:
        """Copy the files ending in ``suffix`` under a folder of the run directory into the local folder
        ``dest`` (same relative paths); return their local paths, sorted. For libraries that read only
        local files (``datasets``) when the run directory is a bucket."""
        base, local = self._fs_path(relpath), pafs.LocalFileSystem()
        out = []
        for path in self.list_files(relpath, suffix):
            target = os.path.join(dest, path[len(base):].lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            pafs.copy_files(path, target, source_filesystem=self.fs, destination_filesystem=local)
            out.append(target)
        return out

    def upload(self, src: str, relpath: str) -> None:
        """Copy the local folder ``src`` (recursively) to a folder of the run directory: for libraries
        that write only local files (``datasets.save_to_disk``) when the run directory is a bucket."""
        dest = self._fs_path(relpath)
        self.fs.create_dir(dest, recursive=True)
        pafs.copy_files(os.path.abspath(src), dest, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

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


def file_identity(fs: pafs.FileSystem, info: pafs.FileInfo, name: str, *, large: str) -> bytes:
    """One file's part of a fingerprint: ``name`` (the caller decides how it is written), its size,
    and the content of a file up to :data:`SMALL_FILE_BYTES`. Small files are identified by content
    because copies (a run directory moved to a bucket, an uploaded job working directory, a clone)
    keep the content but not the mtime. A larger file is not read whole (that would cost as much as
    the stage): ``large="sample"`` hashes its first and last :data:`SAMPLE_BYTES` (outputs of our
    own stages: Ray names Parquet files uniquely per write, and artifacts with fixed names such as
    an index differ at their ends when rebuilt differently); ``large="mtime"`` uses its modification
    time (external inputs, which may change anywhere)."""
    if info.size is not None and info.size <= SMALL_FILE_BYTES:
        with fs.open_input_stream(info.path) as f:
            stamp = hashlib.sha256(f.read()).hexdigest()
    elif large == "sample":
        with fs.open_input_file(info.path) as f:
            head = f.read_at(SAMPLE_BYTES, 0)
            tail = f.read_at(SAMPLE_BYTES, info.size - SAMPLE_BYTES)
        stamp = "sample " + hashlib.sha256(head + tail).hexdigest()
    elif large == "mtime":
        stamp = f"mtime {info.mtime_ns}"
    else:
        raise ValueError(f"large must be 'sample' or 'mtime', got {large!r}")
    return f"{name}:{info.size}:{stamp}\n".encode()


def source_fingerprint(paths: list[str]) -> str:
    """Identifies external input files (see :func:`file_identity`) by their paths as the recipe
    resolved them, shown relative to the project when they lie inside it (:func:`portable`).

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
            h.update(file_identity(fs, i, i.path if is_uri(path) else portable(i.path), large="mtime"))
    return h.hexdigest()[:16]


_HELD: dict[str, int] = {}  # run-directory locks this process holds -> nesting depth


def _holder_info() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"host {holder.get('host')} pid {holder.get('pid')} (since {holder.get('started')})"


def _parse(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


class FileLock:
    """An exclusive ``flock`` on a local file, holding the holder's host/pid/start as JSON."""

    def __init__(self, path: str, run_dir: str):
        self.path, self.run_dir, self.fd = path, run_dir, None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(self.path, encoding="utf-8") as f:
                holder = _parse(f.read())
            os.close(fd)
            raise RunDirLocked(f"run directory {self.run_dir} is in use by {_describe(holder)} (lock "
                               f"{self.path}); wait for that run to end or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_info()).encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        os.ftruncate(self.fd, 0)  # a free lock names no holder
        os.close(self.fd)  # closing releases the flock
        self.fd = None


class MarkerLock:
    """A marker file on a filesystem without locks (object stores): created if absent, deleted at
    the end. ``uri`` is how messages name it."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str):
        self.fs, self.path, self.uri = fs, path, uri
        self.token = uuid.uuid4().hex

    def _read(self) -> dict[str, Any] | None:
        with self.fs.open_input_stream(self.path) as f:
            return _parse(f.read().decode("utf-8")) or {}

    def acquire(self) -> None:
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            holder = self._read()
            if holder and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                raise RunDirLocked(f"lock {self.uri} is stale: its holder {_describe(holder)} is no longer "
                                   f"running on this host; delete {self.uri} and run again")
            raise RunDirLocked(f"run directory {self.uri.rsplit('/', 1)[0]} is in use by {_describe(holder)} "
                               f"(lock {self.uri}); if no run is active there (a run killed on another "
                               f"host leaves it), delete {self.uri} and run again")
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps({**_holder_info(), "token": self.token}).encode())
        holder = self._read()
        if holder.get("token") != self.token:  # another run wrote its marker at the same moment
            raise RunDirLocked(f"run directory {self.uri.rsplit('/', 1)[0]} is in use by {_describe(holder)} "
                               f"(lock {self.uri})")

    def release(self) -> None:
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound and \
                self._read().get("token") == self.token:
            self.fs.delete_file(self.path)

    def __enter__(self) -> MarkerLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _alive(pid: Any) -> bool:
    """Whether a process ``pid`` runs on this host (a pid reused since counts as alive: safe side)."""
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
