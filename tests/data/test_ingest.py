"""Ingestion's input check: every format's columns are read from the file head in the driver, before
any cluster work, and a mapping that names a column the input lacks is one line naming file and key."""

from __future__ import annotations

import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.construction import build_stages, load_recipe
from pipelines.core.config import ConfigError
from pipelines.data.ingest import IngestConfig, IngestStage
from tests.conftest import PYTHON, REPO, write_jsonl


def _parquet(path, table: pa.Table):
    pq.write_table(table, path)
    return path


def test_parquet_and_csv_without_the_text_column_fail_in_the_driver(tmp_path):
    parquet = _parquet(tmp_path / "c.parquet", pa.table({"content": ["文本"], "id": [1]}))
    csv = tmp_path / "c.csv"
    csv.write_text('content,"id"\n"a, quoted",1\n', encoding="utf-8")
    for path in (parquet, csv):
        with pytest.raises(ConfigError) as err:
            IngestStage(IngestConfig(paths=[str(path)]))
        message = str(err.value)
        assert message == (f"stages.ingest.columns.text: input {path} has no column 'text' "
                           "(columns: ['content', 'id'])")
        assert "\n" not in message
        IngestStage(IngestConfig(paths=[str(path)], columns={"text": "content"}))  # right mapping passes


def test_folders_are_checked_on_their_first_file_and_the_message_says_so(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _parquet(folder / "b.parquet", pa.table({"text": ["x"]}))
    _parquet(folder / "a.parquet", pa.table({"body": ["x"]}))
    (folder / "_SUCCESS").write_text("")          # Ray skips names starting with _ or .
    (folder / "notes.txt").write_text("text\n")   # and, for Parquet, other extensions
    with pytest.raises(ConfigError, match=rf"input {folder / 'a.parquet'} \(the first file of {folder}\) "
                                          r"has no column 'text' \(columns: \['body'\]\)"):
        IngestStage(IngestConfig(paths=[str(folder)], format="parquet"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("")
    with pytest.raises(ConfigError, match=rf"stages.ingest.paths: folder {empty} has no parquet files"):
        IngestStage(IngestConfig(paths=[str(empty)], format="parquet"))


def test_a_batch_without_the_column_becomes_error_rows_not_a_failed_task(tmp_path):
    """Files after a folder's first are not checked in the driver; their rows still each end with a
    reason instead of failing the Ray task (as a JSONL line without the key does)."""
    from pipelines.data.ingest import table_batch_to_rows

    config = IngestConfig(paths=[str(_parquet(tmp_path / "a.parquet", pa.table({"text": ["x"]})))])
    rows = table_batch_to_rows(pa.table({"body": ["a", "b"], "path": ["b.parquet"] * 2}),
                               config=config).to_pylist()
    assert [(r["status"], r["reason"], r["origin"]) for r in rows] == [("error", "missing_text", "b.parquet")] * 2


def test_dotted_columns_are_checked_to_the_leaf(tmp_path):
    """``metadata.language`` must exist inside ``metadata``, in JSONL records and Parquet structs."""
    jsonl = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "metadata": {"source": "x"}}])
    with pytest.raises(ConfigError, match=r"columns.text: input .*s.jsonl has no column 'metadata.language' "
                                          r"\(columns: \['metadata', 'metadata.source', 'prompt'\]\)"):
        IngestStage(IngestConfig(paths=[str(jsonl)], columns={"text": "metadata.language"}))
    nested = pa.table({"prompt": ["p"], "metadata": pa.array([{"language": "zh"}])})
    parquet = _parquet(tmp_path / "s.parquet", nested)
    IngestStage(IngestConfig(paths=[str(parquet)], columns={"text": "metadata.language"}))
    with pytest.raises(ConfigError, match=r"has no column 'metadata.lang' "):
        IngestStage(IngestConfig(paths=[str(parquet)], columns={"text": "metadata.lang"}))


def test_seed_stages_check_label_and_keep_columns_and_name_their_key(tmp_path):
    """Columns that decide every row's fate are checked too: a missing label column would make every
    row ``unknown_label``, a missing ``keep`` column would drop every row."""
    parquet = _parquet(tmp_path / "pgm.parquet", pa.table({
        "prompt": ["p"], "prompt_harm_label": ["harmful"], "response": ["r"]}))
    with pytest.raises(ConfigError, match=r"^stages.seeds.pgm.keep: input .* has no column 'metadata.language'"):
        IngestStage(IngestConfig(paths=[str(parquet)], preset="polyguardmix_zh"), name="seeds_pgm")
    with pytest.raises(ConfigError, match=r"^stages.seeds.pgm.columns.label: .* has no column 'harm'"):
        IngestStage(IngestConfig(paths=[str(parquet)], columns={"text": "prompt", "label": "harm"}),
                    name="seeds_pgm")
    # one label for every row: the label column is not read, so not checked
    IngestStage(IngestConfig(paths=[str(parquet)], columns={"text": "prompt", "label": "harm"},
                             label="unsafe"), name="seeds_pgm")


def test_the_repository_recipes_inputs_pass_the_check(monkeypatch):
    monkeypatch.chdir(REPO)  # the demo recipes name their data relative to the repository
    for name in ("demo", "shard_demo"):
        stages = yaml.safe_load((REPO / f"configs/recipes/{name}.yaml").read_text())["stages"]
        sections = {"ingest": stages.get("ingest"),
                    **{f"seeds_{key}": seeds for key, seeds in (stages.get("seeds") or {}).items()}}
        checked = [IngestStage(IngestConfig(**section), name=stage).name
                   for stage, section in sections.items() if section]
        assert checked, name


def test_cli_run_reports_a_missing_column_in_one_line_before_ray_starts(tmp_path):
    corpus = tmp_path / "c.csv"
    corpus.write_text("content\nhello\n", encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "run_dir": str(tmp_path / "run"),
                                      "stages": {"ingest": {"paths": [str(corpus)]}}}))
    assert [s.name for s in build_stages(load_recipe(recipe, ["stages.ingest.columns.text=content"]))] == ["ingest"]
    # on today's bug this would start Ray and fail in a task: bound it so the test cannot hang
    run = subprocess.run([PYTHON, "-m", "pipelines.cli", "run", str(recipe)], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.splitlines() == [
        f"error: stages.ingest.columns.text: input {corpus} has no column 'text' (columns: ['content'])"]
    assert not (tmp_path / "run").exists()  # failed before any work
