"""Column contracts (issue 30): each stage declares the columns it reads from the stages upstream and the
columns its ok rows have; ``build_stages`` checks every edge before Ray starts. The pure check, pass-through
along a chain, ingestion's columns from its mapping, every shipped recipe passing, recipes wired to a stage
without the column refused in one line, and the refusal coming before any cluster work. No Ray.

The shipped recipes name model folders (``models/tiny``, ``${REAL_MODELS}``), shared data files and a
finished run's folder that a test machine may lack. Validation checks that each exists (a model folder:
``config.json`` and a chat template) and building stages loads no weights and reads no rows, so they are
replaced by placeholders of that shape; the ingestion head check (it opens the input files, some on S3)
is switched off. What the column check sees - stage names, inputs, configs - is the recipe's own.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import pipelines.data.ingest as ingest
from pipelines.cli import main
from pipelines.construction import build_stages, load_recipe
from pipelines.core.config import ConfigError
from pipelines.core.contracts import PASSTHROUGH, ColumnError, check_columns, output_columns
from pipelines.core.rows import COMMON_COLUMNS, LINEAGE, SCHEMA_FIELDS
from tests.conftest import REPO

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
_ENV_PATH = re.compile(r"\$\{(REAL_MODELS|TINY_MODELS|CHILLGUARD_SHARED_DATA):-[^}]*\}/([\w./-]+)")
_TINY = re.compile(r"(?<![\w/])models/tiny/([\w.-]+)")


def _model_folder(root: Path, name: str) -> str:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    return str(folder)


def shipped(path: Path, tmp_path: Path, monkeypatch, overrides: dict | None = None) -> Path:
    """The shipped recipe at ``path`` with placeholders for what it names outside the repository (see
    the module docstring), its run directory under ``tmp_path``, read from the repository root (its
    relative paths); ``overrides``: ``{section: value}`` merged under ``stages:``."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(ingest, "check_columns", lambda *args, **kwargs: None)
    roots = {"REAL_MODELS": tmp_path / "real", "TINY_MODELS": tmp_path / "tiny",
             "CHILLGUARD_SHARED_DATA": tmp_path / "shared"}
    for var, root in roots.items():
        monkeypatch.setenv(var, str(root))
    text = path.read_text(encoding="utf-8")
    for var, name in _ENV_PATH.findall(text):
        if var == "CHILLGUARD_SHARED_DATA":
            (roots[var] / name).parent.mkdir(parents=True, exist_ok=True)
            (roots[var] / name).write_text("", encoding="utf-8")
        else:
            _model_folder(roots[var], name)
    text = _TINY.sub(lambda m: _model_folder(roots["TINY_MODELS"], m.group(1)), text)
    finished = tmp_path / "finished_run" / "assemble" / "status=ok"  # loop_ablation reads the demo's dataset
    finished.mkdir(parents=True, exist_ok=True)
    text = text.replace("runs/demo/assemble/status=ok/", f"{finished}/")
    data = yaml.safe_load(text)
    data["run_dir"] = str(tmp_path / "run")
    for section, value in (overrides or {}).items():  # a section's keys merged into the recipe's
        stages = data["stages"]
        stages[section] = {**stages[section], **value} if isinstance(stages.get(section), dict) else value
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


def demo(tmp_path: Path, monkeypatch, **overrides) -> Path:
    return shipped(REPO / "configs/recipes/demo.yaml", tmp_path, monkeypatch, overrides)


# --- the pure check ------------------------------------------------------------------------------


def node(name: str, inputs=(), writes=(), reads=frozenset(), requires=()):
    """A stage as the check sees it."""
    reads_map = reads if isinstance(reads, dict) else {up: frozenset(reads) for up in inputs}
    return SimpleNamespace(name=name, inputs=tuple(inputs), requires=tuple(requires), writes=frozenset(writes),
                           columns_read=lambda: {k: frozenset(v) for k, v in reads_map.items()})


def test_a_pass_through_chain_carries_its_source_columns_to_the_end():
    chain = [node("seeds", writes={"id", "text", "response"}),
             node("normalize", ["seeds"], PASSTHROUGH | {LINEAGE}, {"id", "text"}),
             node("dedup", ["normalize"], PASSTHROUGH, {"id", "text"}),
             node("judge", ["dedup"], {"verdict"}, {"text", "response"})]
    out = check_columns(chain)
    assert out["dedup"] == {"id", "text", "response", LINEAGE}
    assert out["judge"] == {"verdict"}  # no pass-through: only its own


def test_a_pass_through_over_several_inputs_keeps_what_every_input_has():
    stages = [node("rag", writes={"id", "text", "label", "query"}),
              node("seeds", writes={"id", "text", "label", "response"}),
              node("normalize", ["rag", "seeds"], PASSTHROUGH | {LINEAGE}, {"id", "text"}),
              node("dedup", ["normalize"], PASSTHROUGH | {"lang"}, {"id", "text"}),
              node("judge", ["dedup"], {"verdict"}, {"text", "response"})]
    assert output_columns(stages)["dedup"] == {"id", "text", "label", LINEAGE, "lang"}
    with pytest.raises(ColumnError,
                       match=r"^stage judge reads column 'response' from dedup, which does not write it$") as caught:
        check_columns(stages)
    assert (caught.value.consumer, caught.value.producer, caught.value.missing) == ("judge", "dedup", ["response"])
    assert isinstance(caught.value, ConfigError)  # what the driver and the CLI report (exit 2)


def test_the_first_failing_edge_in_run_order_is_named_with_every_missing_column():
    stages = [node("rows", writes={"id", "text"}), node("ok", ["rows"], PASSTHROUGH, {"text"}),
              node("pairs", ["ok"], set(), {"id", "prompt", "chosen", "rejected"}),
              node("late", ["ok"], set(), {"label"})]
    with pytest.raises(ColumnError, match=r"^stage pairs reads columns 'chosen', 'prompt', 'rejected' from ok, "
                                          r"which does not write them$"):
        check_columns(stages)


def test_reads_from_a_required_stage_are_checked_and_reads_from_no_upstream_are_a_declaration_bug():
    scored = node("score", writes={"id", "level"})
    pairs = node("pairs", [], {"chosen"}, {"score": {"id", "quality"}}, requires=["score"])
    with pytest.raises(ColumnError, match=r"^stage pairs reads column 'quality' from score, which does not write it$"):
        check_columns([scored, pairs])
    stray = node("report", [], set(), {"score": {"id"}})
    with pytest.raises(ValueError, match=r"^stage report declares columns it reads from score, which is neither"):
        check_columns([scored, stray])


def test_a_stage_reads_one_set_from_every_input_unless_it_names_them():
    from pipelines.core.stage import Stage

    class Both(Stage):
        name = "both"
        inputs = ("a", "b")
        reads = frozenset({"id", "text"})

    assert Both(None).columns_read() == {"a": {"id", "text"}, "b": {"id", "text"}}
    Both.reads = {"a": frozenset({"id"})}
    assert Both(None).columns_read() == {"a": {"id"}}


# --- ingestion: the columns its mapping fills ----------------------------------------------------


def test_ingestion_writes_the_columns_its_mapping_or_preset_fills(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text('{"prompt": "hi"}\n', encoding="utf-8")
    base = {"id", "text", "source", "method", "parent_id", "iteration", "origin"}
    corpus = ingest.IngestConfig(paths=[str(source)], columns={"text": "prompt", "lang": "lang"})
    assert ingest.written_columns(corpus) == base | {"lang"}  # no label: the jury labels a corpus
    wild = ingest.IngestConfig(paths=[str(source)], preset="wildguardtest")
    assert ingest.written_columns(wild) == base | {"label", "response", "harm_category"}
    assert "split" in ingest.written_columns(wild.model_copy(update={"split": "test"}))
    toxicn = ingest.IngestConfig(paths=[str(source)], preset="toxicn")  # micro_map: a mapped micro gives its macro
    assert {"label", "micro", "macro", "harm_category"} <= ingest.written_columns(toxicn)
    assert ingest.written_columns(ingest.IngestConfig(paths=[str(source)], label="unsafe")) == base | {"label"}


# --- the shipped recipes -------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_passes_the_column_check(path, tmp_path, monkeypatch):
    stages = build_stages(load_recipe(shipped(path, tmp_path, monkeypatch)))  # raises on a failing edge
    columns = check_columns(stages)
    read_from = {up for s in stages for up in s.columns_read()}
    for stage in stages:
        declared = stage.columns_read()
        # every row input is declared (and checked), with the columns it cannot do without
        assert set(stage.inputs) <= set(declared), f"{path.name}: {stage.name} declares no reads from some input"
        assert all(declared.values()), f"{path.name}: {stage.name} declares an empty read"
        if stage.name in read_from:
            assert columns[stage.name], f"{path.name}: {stage.name} is read but writes nothing"
    edges = sum(len(s.columns_read()) for s in stages)
    assert edges >= len([s for s in stages if s.inputs]) > 0


def test_the_demo_columns_follow_the_mappings_through_preprocessing(tmp_path, monkeypatch):
    columns = check_columns(build_stages(load_recipe(demo(tmp_path, monkeypatch))))
    assert "label" not in columns["ingest"] and "response" in columns["seeds_wildguardtest"]
    # rag and pe both carry the row schema: preprocessing keeps it, adds lineage
    assert columns["near_dedup"] >= COMMON_COLUMNS
    assert {"votes", "source_label"} <= columns["jury"] and "split" in columns["assemble"]
    # the loop's candidates keep their seed's split through preprocessing and decontamination
    assert {"split", "seed_text"} <= columns["loop1_decontaminate"]
    assert {"prompt", "chosen", "rejected", "system"} <= columns["loop2_pairs"]
    assert columns["compare_guards"] == set() and set(SCHEMA_FIELDS) - {"label"} <= columns["keywords"]


# --- recipes wired to a stage without the column -------------------------------------------------


def test_a_response_level_evaluation_of_a_set_without_responses_is_refused(tmp_path, monkeypatch):
    recipe = load_recipe(demo(tmp_path, monkeypatch, guard_eval={
        "on_real": {"inputs": ["seeds_real"], "split": None, "level": "response", "model": "guard"}}))
    with pytest.raises(ConfigError, match=r"^recipe demo: stages.guard_eval: stage guard_eval_on_real reads column "
                                          r"'response' from seeds_real, which does not write it$"):
        build_stages(recipe)


def test_chat_sft_on_rows_without_completions_is_refused(tmp_path, monkeypatch):
    path = demo(tmp_path, monkeypatch)
    model = yaml.safe_load(path.read_text(encoding="utf-8"))["models"]["rewriter"]["model"]
    recipe = load_recipe(path, [f"stages.sft.chat={{model: {model}, inputs: [assemble]}}"])
    with pytest.raises(ConfigError, match=r"^recipe demo: stages.sft: stage sft_chat reads column 'completion' from "
                                          r"assemble, which does not write it$"):
        build_stages(recipe)


def test_preference_training_on_rows_that_are_no_pairs_is_refused(tmp_path, monkeypatch):
    path = demo(tmp_path, monkeypatch)
    model = yaml.safe_load(path.read_text(encoding="utf-8"))["models"]["rewriter"]["model"]
    recipe = load_recipe(path, [f"stages.mdpo={{model: {model}, inputs: [assemble], num_workers: 2, "
                                "global_batch_size: 16, micro_batch_size: 8}"])
    with pytest.raises(ConfigError, match=r"^recipe demo: stages.mdpo: stage mdpo reads columns 'chosen', 'prompt', "
                                          r"'rejected' from assemble, which does not write them$"):
        build_stages(recipe)
    # mapped onto columns the rows have, the same rows pass
    build_stages(load_recipe(path, [f"stages.mdpo={{model: {model}, inputs: [assemble], num_workers: 2, "
                                    "global_batch_size: 16, micro_batch_size: 8, "
                                    "columns: {prompt: text, chosen: text, rejected: source_label}}"]))


def test_a_column_passes_through_preprocessing_only_when_every_input_has_it(tmp_path, monkeypatch):
    on_preprocessed = {"guard_eval": {"resp": {"inputs": ["near_dedup"], "split": None, "level": "response",
                                               "model": "guard"}}}
    only_wild = demo(tmp_path / "a", monkeypatch, **on_preprocessed,
                     preprocess={"inputs": ["seeds_wildguardtest"]})
    stages = build_stages(load_recipe(only_wild))  # the seeds' responses reach the evaluation through lineage
    assert [s.name for s in stages if s.name in ("normalize", "near_dedup", "guard_eval_resp")] == [
        "normalize", "near_dedup", "guard_eval_resp"]
    with_rag = demo(tmp_path / "b", monkeypatch, **on_preprocessed,
                    preprocess={"inputs": ["rag", "seeds_wildguardtest"]})
    with pytest.raises(ConfigError, match=r"stage guard_eval_resp reads column 'response' from near_dedup, which "
                                          r"does not write it$"):
        build_stages(load_recipe(with_rag))


# --- before Ray ----------------------------------------------------------------------------------


def test_the_command_line_refuses_the_recipe_before_any_cluster_work(tmp_path, monkeypatch, capsys):
    import cluster.connect

    def no_cluster(*args, **kwargs):
        raise AssertionError("connected to Ray before the column check")

    monkeypatch.setattr(cluster.connect, "connect", no_cluster)
    path = str(demo(tmp_path, monkeypatch, guard_eval={
        "on_real": {"inputs": ["seeds_real"], "split": None, "level": "response", "model": "guard"}}))
    line = ("error: recipe demo: stages.guard_eval: stage guard_eval_on_real reads column 'response' from "
            "seeds_real, which does not write it")
    for argv in (["run", path], ["config", path, "--graph"], ["graph", path]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip() == line
    # run stopped before it locked the run directory (retrieve's constructor made the empty folder)
    assert not [p.name for p in (tmp_path / "run").iterdir()]
