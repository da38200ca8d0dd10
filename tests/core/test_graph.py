"""The run order is the graph of declared inputs (issue 30): the pure ordering, recipes refused for a
cycle or a dangling name, every shipped recipe in an order that follows its inputs, and the graph
printed (``chillguard config --graph``, ``chillguard graph`` as text, DOT and PNG). No Ray."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import pipelines.construction as construction
import pipelines.data.ingest as ingest
from pipelines.cli import main
from pipelines.construction import Recipe, build_stages, load_recipe
from pipelines.core.config import ConfigError, dump_recipe
from pipelines.core.graph import GraphError, depths, graph_dot, graph_text, order_nodes, run_order, upstream_closure
from tests.conftest import REPO, write_jsonl

# --- the pure ordering ---------------------------------------------------------------------------


def test_an_order_that_already_follows_the_inputs_is_kept():
    assert run_order({"b": [], "a": [], "c": ["a"], "d": ["b", "c"]}) == ["b", "a", "c", "d"]


def test_a_stage_moves_down_only_as_far_as_its_inputs_push_it():
    # c is listed first but reads a: it runs right after a, before b (listed before it, ready as well)
    assert run_order({"c": ["a"], "a": [], "b": []}) == ["a", "c", "b"]
    assert run_order({"x": ["z"], "y": [], "z": []}) == ["y", "z", "x"]  # y and z ready first: listed order


def test_diamonds_keep_the_listed_order_between_branches():
    assert run_order({"top": [], "left": ["top"], "right": ["top"], "bottom": ["left", "right"]}) == [
        "top", "left", "right", "bottom"]
    assert run_order({"bottom": ["left", "right"], "right": ["top"], "left": ["top"], "top": []}) == [
        "top", "right", "left", "bottom"]
    # two diamonds sharing a source; a name read twice counts once
    upstream = {"s": [], "a1": ["s"], "a2": ["s"], "a": ["a1", "a2", "a1"], "b1": ["s"], "b": ["b1", "s"]}
    assert run_order(upstream) == ["s", "a1", "a2", "a", "b1", "b"]
    assert depths(run_order(upstream), upstream) == {"s": 0, "a1": 1, "a2": 1, "a": 2, "b1": 1, "b": 2}


def test_a_cycle_is_refused_naming_it():
    with pytest.raises(GraphError) as err:
        run_order({"a": [], "b": ["a", "d"], "c": ["b"], "d": ["c"], "e": ["d"]})
    assert err.value.cycle == ["b", "c", "d", "b"] and str(err.value) == "a cycle: b -> c -> d -> b"
    with pytest.raises(GraphError, match=r"^a cycle: a -> a$"):
        run_order({"a": ["a"], "b": []})


def test_a_dangling_name_is_refused_naming_who_reads_it():
    with pytest.raises(GraphError) as err:
        run_order({"a": [], "b": ["a", "x"], "c": ["y", "z"]})
    assert err.value.dangling == {"b": ["x"], "c": ["y", "z"]}
    assert str(err.value) == ("b depends on x, which is not in the graph; "
                              "c depends on y, z, which are not in the graph")
    assert "\n" not in str(err.value)


def _stage(name: str, inputs=(), requires=()) -> SimpleNamespace:
    return SimpleNamespace(name=name, inputs=tuple(inputs), requires=tuple(requires))


def test_nodes_are_ordered_by_inputs_and_requires_and_named_once():
    nodes = [_stage("eval", ["rows"], ["train"]), _stage("train", ["rows"]), _stage("rows")]
    assert [n.name for n in order_nodes(nodes)] == ["rows", "train", "eval"]
    with pytest.raises(GraphError, match="two stages are named rows"):
        order_nodes([_stage("rows"), _stage("rows")])


def test_upstream_closure_keeps_what_the_targets_depend_on_in_order():
    nodes = [_stage("rows"), _stage("other"), _stage("train", ["rows"]), _stage("eval", ["rows"], ["train"]),
             _stage("report", ["eval"])]
    assert [n.name for n in upstream_closure(nodes, ["eval"])] == ["rows", "train", "eval"]
    assert [n.name for n in upstream_closure(nodes, ["train", "other"])] == ["rows", "other", "train"]
    with pytest.raises(GraphError, match=r"^no stage is named evall \(did you mean eval\?\)$"):
        upstream_closure(nodes, ["evall"])


def test_graph_text_and_dot():
    stages = [_stage("rows"), _stage("train", ["rows"]), _stage("eval", ["rows"], ["train"])]
    assert graph_text(stages).splitlines() == ["  1  rows", "  2  train  <- rows",
                                               "  3  eval   <- rows  requires train"]
    dot = graph_dot(stages, title='a "demo"')
    assert dot.startswith('digraph "a \\"demo\\"" {') and dot.rstrip().endswith("}")
    assert '"rows" -> "train";' in dot and '"train" -> "eval" [style=dashed];' in dot


# --- recipes: build order, validation, the errors of build_stages ------------------------------


def _models(tiny_models) -> dict:
    return {"rw": {"engine": "vllm", "model": tiny_models["causal-lm"]}}


def _seeds(tmp_path: Path) -> dict:
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"text": "你好", "id": "s1", "label": "safe"}])
    return {"paths": [str(seeds)]}


def test_sections_listed_in_any_order_run_in_the_order_of_their_inputs(tmp_path, tiny_models):
    """An input may name a row stage of a section listed later (the old ``after`` order refused a
    preprocess reading the jury); ties follow the recipe's listing, also read back resolved."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "run_dir": str(tmp_path / "run"), "models": _models(tiny_models),
        "stages": {"preprocess": {"inputs": ["jury"], "langid": None, "near_dedup": None},
                   "seeds": {"b": _seeds(tmp_path), "a": _seeds(tmp_path)},
                   "jury": {"inputs": ["seeds_a"], "judges": ["rw"]}},
    }, sort_keys=False))
    recipe = load_recipe(path)
    order = ["seeds_b", "seeds_a", "jury", "normalize", "length_filter", "dedup"]
    assert [s.name for s in build_stages(recipe)] == order
    # a run's recipe.yaml lists the sections as the recipe did: read back, the same order
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_recipe(recipe))
    assert list(yaml.safe_load(resolved.read_text())["stages"])[:3] == ["preprocess", "seeds", "jury"]
    assert [s.name for s in build_stages(load_recipe(resolved, resolved=True))] == order


def test_inputs_that_form_a_cycle_are_a_recipe_error_before_ray(tmp_path, tiny_models, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "run_dir": str(tmp_path / "run"), "models": _models(tiny_models),
        "stages": {"seeds": {"a": _seeds(tmp_path)},
                   "preprocess": {"inputs": ["seeds_a", "jury"], "langid": None},
                   "jury": {"inputs": ["near_dedup"], "judges": ["rw"]}},
    }, sort_keys=False))
    cycle = ("the inputs form a cycle (stages.preprocess -> stages.jury -> stages.preprocess): "
             "stages.jury.inputs names near_dedup; stages.preprocess.inputs names jury")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert cycle in str(err.value)
    assert main(["config", str(path)]) == 2 and main(["run", str(path)]) == 2
    assert capsys.readouterr().err.count(cycle) == 2
    assert not (tmp_path / "run").exists()  # refused before any work
    # a section that reads its own stages is a cycle too
    with pytest.raises(ConfigError, match=r"the inputs form a cycle \(stages.preprocess -> stages.preprocess\): "
                                          r"stages.preprocess.inputs names dedup$"):
        load_recipe(path, ["stages.preprocess.inputs=[seeds_a, dedup]", "stages.jury.inputs=[seeds_a]"])
    # a name that is no enabled row stage: one line, the recipe key
    with pytest.raises(ConfigError, match=r"stages.jury.inputs: \['nope'\] are not enabled row stages"):
        load_recipe(path, ["stages.jury.inputs=[nope]"])


def test_build_stages_refuses_the_stages_own_cycles_and_dangling_names(tmp_path, monkeypatch):
    """What validation cannot see (the edges a section makes itself) is checked on the built stages."""
    recipe = Recipe.model_validate({"name": "t", "run_dir": str(tmp_path / "run")})

    def sections(**built):
        return [SimpleNamespace(key=key, section=lambda stages: None, build=lambda r, s, st=st: st)
                for key, st in built.items()]

    monkeypatch.setattr(construction, "listed_entries", lambda stages: sections(
        x=[_stage("a", ["b"])], y=[_stage("b", ["a"]), _stage("c")]))
    with pytest.raises(ConfigError, match=r"^recipe t: stages.x, stages.y: the stages' inputs form a cycle "
                                          r"\(a -> b -> a\)$"):
        build_stages(recipe)
    monkeypatch.setattr(construction, "listed_entries", lambda stages: sections(
        x=[_stage("a"), _stage("b", ["a"], ["nope"])]))
    with pytest.raises(ConfigError, match=r"^recipe t: stages.x: stage b reads nope, which is no enabled stage "
                                          r"of the recipe$"):
        build_stages(recipe)


# --- the shipped recipes ----------------------------------------------------------------------

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
#: recipes that validate anywhere the tests run (the others need real models, shared data or a run)
ALWAYS = {"demo", "shard_demo", "chillguard_paper", "shard_paper"}
DEMO_ORDER = [
    "keywords", "ingest", "seeds_real", "seeds_chinesesafe", "seeds_wildguardtest", "embed", "index",
    "retrieve", "rag", "pe", "normalize", "langid", "length_filter", "dedup", "near_dedup", "jury", "adjudicate",
    "assemble", "loop0_train_c0", "loop0_eval_c0", "loop1_generate", "loop1_normalize", "loop1_langid",
    "loop1_length_filter", "loop1_dedup", "loop1_near_dedup", "loop1_decontaminate", "loop1_train_c1",
    "loop2_label", "loop2_score", "loop2_pairs", "loop2_mdpo", "loop2_generate", "loop2_normalize",
    "loop2_langid", "loop2_length_filter", "loop2_dedup", "loop2_near_dedup", "loop2_decontaminate",
    "loop2_train_c2", "loop2_eval_c2", "loop_report", "guard_eval_c2_wildguard", "guard_eval_baseline_test",
    "guard_eval_baseline_wildguard", "compare_guards"]


def _shipped(path: Path, tmp_path: Path, tiny_models, monkeypatch) -> Path:
    """The shipped recipe with the session's tiny models for ``models/tiny``, its run directory under
    ``tmp_path``, read from the repository root (its relative paths); cloud inputs are not opened
    (the column check reads their heads; it decides no stage's name or inputs)."""
    tiny = str(Path(tiny_models["causal-lm"]).parent)
    monkeypatch.setenv("TINY_MODELS", tiny)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(ingest, "check_columns", lambda *args, **kwargs: None)
    data = yaml.safe_load(path.read_text(encoding="utf-8").replace("models/tiny/", tiny + "/"))
    data["run_dir"] = str(tmp_path / "run")
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_run_every_stage_after_what_it_reads(path, tmp_path, tiny_models, monkeypatch):
    try:
        recipe = load_recipe(_shipped(path, tmp_path, tiny_models, monkeypatch))
    except ConfigError as exc:
        if path.stem in ALWAYS:
            raise
        pytest.skip(f"{path.name} does not validate here: {str(exc).splitlines()[-1].strip()}")
    stages = build_stages(recipe)
    done: set[str] = set()
    for stage in stages:
        early = [n for n in (*stage.inputs, *stage.requires) if n not in done]
        assert not early, f"{path.name}: {stage.name} runs before {early}"
        done.add(stage.name)
    assert len(done) == len(stages) > 1
    if path.stem == "demo":  # the order it ran in before issue 30, stage for stage
        assert [s.name for s in stages] == DEMO_ORDER


# --- chillguard config --graph, chillguard graph ------------------------------------------------


def test_graph_commands_print_the_demo_as_text_and_dot(tmp_path, tiny_models, monkeypatch, capsys):
    demo = str(_shipped(REPO / "configs/recipes/demo.yaml", tmp_path, tiny_models, monkeypatch))
    assert main(["graph", demo]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert [line.split()[1] for line in lines] == DEMO_ORDER
    assert lines[0].split() == ["1", "keywords"]
    assert lines[5].split() == ["6", "embed", "<-", "ingest"]
    assert lines[7].split() == ["8", "retrieve", "requires", "keywords,", "ingest,", "embed,", "index"]
    assert "loop0_eval_c0" in lines[19] and lines[19].split()[2:] == ["<-", "assemble", "requires", "loop0_train_c0"]
    assert main(["config", demo, "--graph"]) == 0
    assert capsys.readouterr().out == text

    assert main(["graph", demo, "--dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith('digraph "demo" {\n') and dot.endswith("}\n")
    assert '  "ingest" -> "embed";' in dot and '  "index" -> "retrieve" [style=dashed];' in dot
    assert '  "loop2_train_c2" -> "guard_eval_c2_wildguard" [style=dashed];' in dot
    assert sum(line.endswith(";") and "->" not in line for line in dot.splitlines()[3:]) == len(DEMO_ORDER)


def test_graph_png_is_a_png(tmp_path, tiny_models, monkeypatch, capsys):
    demo = str(_shipped(REPO / "configs/recipes/demo.yaml", tmp_path, tiny_models, monkeypatch))
    out = tmp_path / "demo.png"
    assert main(["graph", demo, "--png", str(out)]) == 0
    assert capsys.readouterr().out == ""  # only the file (and "wrote ..." on stderr)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 400 and height > 1000 and len(data) > 20_000  # 46 stages in ~40 rows


def test_graph_and_config_import_matplotlib_only_for_a_png(tmp_path, tiny_models, monkeypatch):
    demo = str(_shipped(REPO / "configs/recipes/demo.yaml", tmp_path, tiny_models, monkeypatch))
    probe = ("import sys; from pipelines.cli import main; "
             f"assert main(['graph', {demo!r}, '--dot']) == 0 and main(['config', {demo!r}, '--graph']) == 0; "
             "print('HEAVY', sorted(m for m in ('matplotlib', 'torch', 'vllm', 'transformers', 'ray.data', "
             "'sklearn', 'fastapi', 'ray.serve') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY []" in done.stdout.splitlines()


def test_run_until_an_unknown_stage_is_a_one_line_error_before_ray(tmp_path, tiny_models, monkeypatch, capsys):
    demo = str(_shipped(REPO / "configs/recipes/demo.yaml", tmp_path, tiny_models, monkeypatch))
    assert main(["run", demo, "--until", "jury,loop1_relabl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --until: no stage is named loop1_relabl (did you mean loop2_label")
    assert "\n" not in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
