"""The run directory and the runner's bookkeeping: config hashes, input fingerprints, accounting,
the run-directory lock and `chillguard status` on a path that is no run directory.

Everything here but the multi-input test runs without Ray: fake stages write their Parquet
partitions with pyarrow, and stages with row inputs get their upstream datasets from a stub of the
runner's reader (their ``write`` does not look at them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from pipelines.core.config import LLMEndpoint
from pipelines.core.rows import ERROR, OK, make_row, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.stage import AccountingError, Stage, run_stages
from pipelines.data.embedding import EmbedConfig
from pipelines.data.preprocess import TranslateConfig
from pipelines.data.retrieval import RetrieveConfig
from pipelines.data.rewrite import RewriteConfig
from pipelines.data.vector_index import IndexConfig
from pipelines.labelling.jury import JuryConfig
from pipelines.training.sft import GuardSFTConfig
from tests.conftest import PYTHON, REPO, assert_balanced, write_jsonl

TAXONOMY = str(REPO / "configs" / "taxonomy.yaml")
REWRITE_TEMPLATE = str(REPO / "configs" / "prompts" / "rewrite_to_prompts.yaml")


# ------------------------------------------------------------------------------------------------
# Config hashes: operational settings out, everything that changes the output in


def _endpoint(**overrides) -> LLMEndpoint:
    return LLMEndpoint(**{"engine": "vllm", "model": "Qwen/Qwen3-8B",
                          "engine_kwargs": {"max_model_len": 4096}, **overrides})


def _rewrite_hash(**endpoint) -> str:
    from pipelines.data.rewrite import RewriteStage

    return RewriteStage(RewriteConfig(model="m", template=REWRITE_TEMPLATE), _endpoint(**endpoint)).config_hash()


def test_operational_endpoint_settings_leave_an_llm_stage_hash_unchanged():
    base = _rewrite_hash()
    for change in ({"concurrency": 8}, {"concurrency": (1, 16)}, {"batch_size": 256},
                   {"max_concurrent_batches": 16}, {"accelerator_type": "H100"},
                   {"log_engine_metrics": True}, {"env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}):
        assert _rewrite_hash(**change) == base, change


def test_engine_env_reaches_the_engine_actors_and_only_vllm_takes_it():
    from actors.llm import engine_config

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert engine_config(_endpoint(env=env)).runtime_env == {"env_vars": env}
    assert engine_config(_endpoint()).runtime_env is None
    with pytest.raises(ValueError, match="env is only for engine: vllm"):
        LLMEndpoint(engine="http", model="m", url="http://127.0.0.1:1/v1/chat/completions", env=env)
    http = {"engine": "http", "model": "deepseek-chat", "url": "https://api.example.com/v1/chat/completions",
            "engine_kwargs": {}}
    base_http = _rewrite_hash(**http)
    for change in ({"qps": 50}, {"max_retries": 10}, {"api_key_env": "OTHER_KEY"}):
        assert _rewrite_hash(**http, **change) == base_http, change


def test_settings_that_change_answers_change_an_llm_stage_hash():
    base = _rewrite_hash()
    for change in ({"model": "Qwen/Qwen3-4B"}, {"sampling": {"temperature": 0.2}},
                   {"sampling": {"max_tokens": 8}}, {"engine_kwargs": {"max_model_len": 2048}},
                   {"chat_template_kwargs": {"enable_thinking": False}}, {"structured_outputs": False}):
        assert _rewrite_hash(**change) != base, change


def test_operational_stage_settings_leave_the_hash_unchanged(tmp_path):
    from pipelines.data.embedding import EmbedStage
    from pipelines.data.preprocess import TranslateStage
    from pipelines.data.retrieval import RetrieveStage
    from pipelines.data.vector_index import IndexStage
    from pipelines.labelling.jury import JuryStage

    embed = EmbedConfig(model="BAAI/bge-m3")
    assert EmbedStage(embed).config_hash() == EmbedStage(embed.model_copy(update={
        "batch_size": 8, "encode_batch_size": 8, "concurrency": 4, "device": "cpu", "num_cpus": 2,
        "torch_threads": 2})).config_hash()
    assert EmbedStage(embed).config_hash() != EmbedStage(embed.model_copy(update={"max_seq_length": 64})).config_hash()

    translate = TranslateConfig(model="Helsinki-NLP/opus-mt-en-zh")
    same = translate.model_copy(update={"batch_size": 8, "concurrency": 3, "device": "cpu", "num_cpus": 2,
                                        "torch_threads": 4})
    assert TranslateStage(translate, ("langid",)).config_hash() == TranslateStage(same, ("langid",)).config_hash()
    beams = translate.model_copy(update={"num_beams": 4})
    assert TranslateStage(translate, ("langid",)).config_hash() != TranslateStage(beams, ("langid",)).config_hash()

    index = IndexConfig(kind="ivf")
    assert IndexStage(index, 0).config_hash() == IndexStage(
        index.model_copy(update={"threads": 8, "num_cpus": 4}), 0).config_hash()

    def retrieve(**kw):
        return RetrieveStage(RetrieveConfig(**kw), embed, TAXONOMY, 0, str(tmp_path)).config_hash()
    assert retrieve() == retrieve(search_actors=4)
    assert retrieve() != retrieve(top_k=50)

    models = {"j1": _endpoint(), "j2": _endpoint(model="Qwen/Qwen3-4B")}
    jury = JuryConfig(inputs=["near_dedup"], judges=["j1", "j2"])
    scaled = {"j1": _endpoint(concurrency=4, batch_size=16), "j2": _endpoint(model="Qwen/Qwen3-4B", concurrency=2)}
    assert JuryStage(jury, models, TAXONOMY).config_hash() == JuryStage(
        jury.model_copy(update={"mode": "sequential"}), scaled, TAXONOMY).config_hash()


def test_training_hash_keeps_batch_geometry_and_drops_bookkeeping():
    from pipelines.training.sft import GuardSFTStage

    def sft(**kw):
        return GuardSFTStage(GuardSFTConfig(model="Qwen/Qwen3-0.6B", **kw), TAXONOMY).config_hash()

    base = sft()
    for change in ({"cpus_per_worker": 4}, {"report_every_steps": 1}, {"checkpoint_every_steps": 5},
                   {"keep_checkpoints": 5}, {"stop_after_steps": 3}, {"gradient_checkpointing": True}):
        assert sft(**change) == base, change
    # Which rows meet in one optimizer step, and how the loss is averaged, are the math itself.
    for change in ({"num_workers": 4}, {"micro_batch_size": 4}, {"global_batch_size": 32},
                   {"learning_rate": 2e-5}, {"use_gpu": True}):
        assert sft(**change) != base, change


def test_semantic_dump_drops_marked_fields_at_every_depth():
    from pydantic import Field

    from pipelines.core.config import OPERATIONAL, Strict, semantic_dump

    class Inner(Strict):
        keep: int = 1
        speed: int = Field(2, json_schema_extra=OPERATIONAL)

    class Outer(Strict):
        inner: Inner = Field(default_factory=Inner)
        many: dict[str, Inner] = Field(default_factory=lambda: {"a": Inner()})
        listed: list[Inner] = Field(default_factory=lambda: [Inner()])
        workers: int = Field(3, json_schema_extra=OPERATIONAL)
        pair: tuple[float, float] = (0.9, 0.999)

    assert semantic_dump(Outer()) == {"inner": {"keep": 1}, "many": {"a": {"keep": 1}},
                                      "listed": [{"keep": 1}], "pair": [0.9, 0.999]}


# ------------------------------------------------------------------------------------------------
# Resume: upstream config changes reach downstream stages, operational changes reach nothing


class FixedNameIndex(Stage):
    """Like the FAISS index: fixed file names whose sizes do not depend on the search settings."""

    name = "index"

    def write(self, inputs: dict, rundir: RunDir) -> None:
        rundir.write_bytes("index/index.faiss", b"\0" * 64)
        rundir.write_text("index/params.json", f'{{"nprobe": {self.config.nprobe:3d}}}')  # same size


class Searcher(Stage):
    name = "retrieve"
    requires = ("index",)
    unhashed = Stage.unhashed | {"calls"}  # counts its runs

    def __init__(self, config: Any):
        super().__init__(config)
        self.calls = 0

    def expected_rows_in(self) -> int:
        return 2

    def write(self, inputs: dict, rundir: RunDir) -> None:
        self.calls += 1
        rundir.write_table(self.name, OK, to_table([make_row(id="q1"), make_row(id="q2")]))


def test_changed_upstream_config_recomputes_downstream_with_identical_output_sizes(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    searcher = Searcher(RetrieveConfig())
    first = run_stages([FixedNameIndex(IndexConfig(kind="ivf", nprobe=32)), searcher], rundir)
    assert searcher.calls == 1
    second = run_stages([FixedNameIndex(IndexConfig(kind="ivf", nprobe=64)), searcher], rundir)
    assert second["index"]["config_hash"] != first["index"]["config_hash"]
    assert searcher.calls == 2, "retrieve kept results searched with the old nprobe"
    assert second["retrieve"]["input_fingerprint"] != first["retrieve"]["input_fingerprint"]


def test_scaling_a_finished_run_recomputes_nothing(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    searcher = Searcher(RetrieveConfig())
    first = run_stages([FixedNameIndex(IndexConfig(kind="ivf")), searcher], rundir)
    second = run_stages([FixedNameIndex(IndexConfig(kind="ivf", threads=16, num_cpus=8)),
                         Searcher(RetrieveConfig(search_actors=8))], rundir)
    assert second == first  # both skipped: manifests untouched


def test_index_to_retrieve_fingerprint_with_the_real_stages(tmp_path):
    """nprobe 32 -> 64: the index rewrites the same files with the same sizes; retrieve must still see
    a different input fingerprint (it includes the index's config hash)."""
    from pipelines.core.stage import input_fingerprint
    from pipelines.data.retrieval import RetrieveStage
    from pipelines.data.vector_index import IndexStage

    old, new = IndexStage(IndexConfig(kind="ivf", nprobe=32), 0), IndexStage(IndexConfig(kind="ivf", nprobe=64), 0)
    assert old.config_hash() != new.config_hash()
    retrieve = RetrieveStage(RetrieveConfig(), EmbedConfig(model="BAAI/bge-m3"), TAXONOMY, 0, str(tmp_path))
    upstream = {name: {"config_hash": f"{name}-hash", "input_fingerprint": f"{name}-in",
                       "output_fingerprint": f"{name}-out"} for name in retrieve.requires}
    before = input_fingerprint(retrieve, {**upstream,
                                          "index": {**upstream["index"], "config_hash": old.config_hash()}})
    after = input_fingerprint(retrieve, {**upstream, "index": {**upstream["index"], "config_hash": new.config_hash()}})
    assert before != after


def test_output_fingerprint_sees_a_rewrite_of_the_same_size(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    rundir.write_text("index/params.json", '{"nprobe": 32}')
    before = rundir.output_fingerprint("index")
    rundir.write_text("index/params.json", '{"nprobe": 64}')
    assert rundir.output_fingerprint("index") != before


def test_config_hashes_do_not_change_when_the_project_moves(tmp_path, monkeypatch):
    """``ray job submit`` unpacks the project under a new folder on every cluster start: paths inside
    the project enter config hashes relative to it, so a resumed job recomputes nothing."""
    import shutil

    import pipelines.core.config as config_module
    from pipelines.core.config import portable
    from pipelines.data.rewrite import RewriteStage

    here = RewriteStage(RewriteConfig(model="m", template=REWRITE_TEMPLATE), _endpoint()).config_hash()
    moved = tmp_path / "elsewhere"
    shutil.copytree(REPO / "configs", moved / "configs")
    monkeypatch.setattr(config_module, "PROJECT", moved)
    there_template = str(moved / "configs" / "prompts" / "rewrite_to_prompts.yaml")
    assert portable(there_template) == "<project>/configs/prompts/rewrite_to_prompts.yaml"
    there = RewriteStage(RewriteConfig(model="m", template=there_template), _endpoint()).config_hash()
    assert there == here
    # a file outside the project keeps its absolute path, and another template is another hash
    outside = tmp_path / "mine.yaml"
    outside.write_text(Path(REWRITE_TEMPLATE).read_text() + "\n# edited\n")
    assert portable(str(outside)) == str(outside)
    assert RewriteStage(RewriteConfig(model="m", template=str(outside)), _endpoint()).config_hash() != here


def test_a_run_directory_copied_elsewhere_keeps_its_fingerprints(tmp_path):
    """Output fingerprints name files relative to the stage folder and identify small files by
    content, so a copy (new paths, new mtimes) fingerprints the same; a changed byte does not."""
    import shutil
    import time

    first = RunDir(str(tmp_path / "a"))
    first.write_text("index/params.json", '{"nprobe": 32}')
    first.write_table("index", OK, to_table([make_row(id="x", text="t")]))
    before = first.output_fingerprint("index")
    time.sleep(0.01)  # a copy made later has later mtimes
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy)  # copy: mtime not kept
    second = RunDir(str(tmp_path / "b"))
    assert second.output_fingerprint("index") == before
    second.write_text("index/params.json", '{"nprobe": 64}')
    assert second.output_fingerprint("index") != before


def test_large_artifacts_are_fingerprinted_by_head_and_tail(tmp_path):
    from pipelines.core.rundir import SAMPLE_BYTES, SMALL_FILE_BYTES

    rundir = RunDir(str(tmp_path / "run"))
    size = SMALL_FILE_BYTES + 3 * SAMPLE_BYTES
    rundir.write_bytes("index/index.faiss", bytes(size))
    before = rundir.output_fingerprint("index")
    rundir.write_bytes("index/index.faiss", bytes(size))  # the same bytes again: a new mtime only
    assert rundir.output_fingerprint("index") == before
    rundir.write_bytes("index/index.faiss", bytes(size - 1) + b"\x01")  # last byte differs, same size
    assert rundir.output_fingerprint("index") != before


def test_source_fingerprint_reads_small_inputs_by_content(tmp_path):
    """Small input files are identified by content (a clone or an uploaded working directory keeps
    the content, not the mtime); a rewrite with the same size but other bytes is a change."""
    import time

    from pipelines.core.rundir import source_fingerprint

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "aaaa"}])
    before = source_fingerprint([str(corpus)])
    time.sleep(0.01)
    corpus.write_text(corpus.read_text())  # same bytes, new mtime
    assert source_fingerprint([str(corpus)]) == before
    corpus.write_text(corpus.read_text().replace("aaaa", "bbbb"))
    assert source_fingerprint([str(corpus)]) != before


# ------------------------------------------------------------------------------------------------
# Accounting


class Rows(Stage):
    """A source stage that plans ``expected`` rows and writes the given ones."""

    def __init__(self, name: str, expected: int | None, ok: list[dict], errors: list[dict] = ()):
        super().__init__(IndexConfig(), name=name)
        self.expected, self.ok, self.errors = expected, ok, list(errors)

    def expected_rows_in(self) -> int | None:
        return self.expected

    def write(self, inputs: dict, rundir: RunDir) -> None:
        if self.ok:
            rundir.write_table(self.name, OK, to_table(self.ok))
        if self.errors:
            rundir.write_table(self.name, ERROR, to_table(self.errors))


class FanOut(Rows):
    """Reads ``src`` and writes what it is told (each output row's parent_id is an input id)."""

    inputs = ("src",)
    fan_out = True

    def __init__(self, ok: list[dict], errors: list[dict] = ()):
        super().__init__("fan", None, ok, errors)


@pytest.fixture()
def no_ray_inputs(monkeypatch):
    """The runner hands stages Ray datasets of their inputs; these stages write without reading them."""
    monkeypatch.setattr("pipelines.core.stage.read_ok", lambda rundir, stage: None)


def _row(id: str, parent: str = "", **kw) -> dict:
    return make_row(id=id, parent_id=parent, **kw)


def test_a_stage_that_loses_a_row_raises_naming_it(tmp_path):
    with pytest.raises(AccountingError, match="stage lossy: 3 rows in"):
        run_stages([Rows("lossy", 3, [_row("a"), _row("b")])], RunDir(str(tmp_path)))


def test_a_stage_that_invents_a_row_raises_naming_it(tmp_path, no_ray_inputs):
    with pytest.raises(AccountingError, match="stage inventive: 2 rows in"):
        run_stages([Rows("inventive", 2, [_row("a"), _row("b"), _row("c")])], RunDir(str(tmp_path)))
    # one-to-one stage with inputs: one row more than it read
    src = Rows("src", 2, [_row("a"), _row("b")])

    class OneToOne(Rows):
        inputs = ("src",)
    with pytest.raises(AccountingError, match="stage copy: 2 rows in"):
        run_stages([src, OneToOne("copy", None, [_row("a"), _row("b"), _row("b2")])], RunDir(str(tmp_path)))


def test_fan_out_counts_a_parent_with_ok_and_error_rows_once(tmp_path, no_ray_inputs):
    rundir = RunDir(str(tmp_path))
    manifests = run_stages([Rows("src", 2, [_row("p1"), _row("p2")]),
                            FanOut(ok=[_row("c1", "p1"), _row("c2", "p1"), _row("c3", "p2")],
                                   errors=[_row("e1", "p1", status=ERROR, reason="unparseable_output")])],
                           rundir)
    assert manifests["fan"]["rows"] == {"in": 2, "out": 3, "out_parents": 2, "dropped": 0, "errored": 1}
    assert_balanced(manifests["fan"], rundir)


def test_fan_out_parent_ids_must_be_input_ids(tmp_path, no_ray_inputs):
    src = Rows("src", 2, [_row("p1"), _row("p2")])
    with pytest.raises(AccountingError, match=r"stage fan: .*parent_id.*'ghost'"):
        run_stages([src, FanOut(ok=[_row("c1", "p1"), _row("c2", "ghost")],
                                errors=[_row("p2", "p2", status=ERROR, reason="inference_error")])],
                   RunDir(str(tmp_path / "a")))
    # an input without any row of its own is lost, even when the counts would add up
    with pytest.raises(AccountingError, match=r"stage fan: .*'p2'"):
        run_stages([src, FanOut(ok=[_row("c1", "p1"), _row("c2", "p1")],
                                errors=[_row("e", "p1", status=ERROR, reason="inference_error")])],
                   RunDir(str(tmp_path / "b")))


def test_assert_balanced_recounts_the_files(tmp_path):
    rundir = RunDir(str(tmp_path))
    manifest = run_stages([Rows("src", 2, [_row("a")], [_row("b", status=ERROR, reason="x")])], rundir)["src"]
    assert_balanced(manifest, rundir)
    rundir.write_table("src", OK, to_table([_row("c")]), name="part-extra.parquet")  # a file appeared
    with pytest.raises(AssertionError):
        assert_balanced(manifest, rundir)


# ------------------------------------------------------------------------------------------------
# A stage with several inputs, one of which has no ok rows (real Ray Data)


class Union(Stage):
    name = "merged"
    inputs = ("full", "only_errors", "nothing")

    def build(self, inputs: dict) -> Any:
        from pipelines.core.rows import union_all

        assert inputs["only_errors"].columns() == inputs["full"].columns()  # the upstream's schema
        return union_all([inputs[name] for name in self.inputs]).map_batches(
            lambda batch: batch.append_column("status", pa.array([OK] * batch.num_rows, pa.string())),
            batch_format="pyarrow")


@pytest.mark.slow
def test_a_stage_reads_an_input_without_ok_rows_as_empty(tmp_path, ray_local):
    """Heavy (Ray): run under flock /tmp/chillguard-heavy.lock."""
    rundir = RunDir(str(tmp_path / "run"))

    def strip(rows):  # as Ray Data writes partitions: the status is the folder, not a column
        return [{k: v for k, v in r.items() if k != "status"} for r in rows]

    class Plain(Rows):
        def write(self, inputs: dict, rundir: RunDir) -> None:
            if self.ok:
                rundir.write_table(self.name, OK, pa.Table.from_pylist(strip(self.ok)))
            if self.errors:
                rundir.write_table(self.name, ERROR, pa.Table.from_pylist(strip(self.errors)))

    manifests = run_stages([Plain("full", 2, [_row("a"), _row("b")]),
                            Plain("only_errors", 1, [], [_row("x", status=ERROR, reason="bad")]),
                            Plain("nothing", 0, []), Union(IndexConfig())], rundir)
    assert manifests["merged"]["rows"]["in"] == 2 and manifests["merged"]["rows"]["out"] == 2
    assert sorted(rundir.column_values("merged", OK, "id")) == ["a", "b"]


# ------------------------------------------------------------------------------------------------
# One run at a time per run directory

HOLD = """
import sys, time
from pipelines.core.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_the_same_run_dir_is_refused_until_the_first_ends(tmp_path):
    from pipelines.core.rundir import RunDirLocked

    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunDirLocked) as caught, RunDir(str(run_dir)).lock():
            pass
        message = str(caught.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and str(run_dir) in message
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # a crash: the kernel releases the lock
        holder.wait(30)
    # the same process may nest (the CLI, then run_recipe)
    with RunDir(str(run_dir)).lock(), RunDir(str(run_dir)).lock():
        pass


def test_chillguard_run_refuses_a_run_dir_in_use(tmp_path, capsys):
    from pipelines.cli import main

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "hello"}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "run_dir": str(tmp_path / "run"),
                                      "stages": {"ingest": {"paths": [str(corpus)]}}}))
    holder = _holder(tmp_path / "run")
    try:
        code = main(["run", str(recipe)])
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(30)
    assert code == 4
    assert "in use" in capsys.readouterr().err
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # refused before writing anything


def test_uri_lock_is_a_marker_file_and_reports_a_stale_one(tmp_path):
    """Cloud run directories have no kernel lock: a marker created if absent, removed at the end."""
    import pyarrow.fs as pafs

    from pipelines.core.rundir import MarkerLock, RunDirLocked

    fs, path = pafs.LocalFileSystem(), str(tmp_path / "LOCK")
    with MarkerLock(fs, path, "s3://bucket/run/LOCK"):
        assert "pid" in (tmp_path / "LOCK").read_text()
        with pytest.raises(RunDirLocked, match="in use"):
            MarkerLock(fs, path, "s3://bucket/run/LOCK").acquire()
    assert not (tmp_path / "LOCK").exists()

    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                               "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(RunDirLocked, match=r"stale.*delete s3://bucket/run/LOCK"):
        MarkerLock(fs, path, "s3://bucket/run/LOCK").acquire()


# ------------------------------------------------------------------------------------------------
# chillguard status


def test_status_of_a_path_that_is_no_run_directory_fails(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["status", str(tmp_path / "typo")]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()  # not created by looking at it
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) != 0
    assert "not a run directory" in capsys.readouterr().err

    rundir = RunDir(str(tmp_path / "run"))
    run_stages([Rows("src", 1, [_row("a")])], rundir)
    assert main(["status", str(tmp_path / "run")]) == 0
    assert "src" in capsys.readouterr().out
