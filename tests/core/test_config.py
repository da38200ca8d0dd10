import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.construction import build_stages, load_recipe
from pipelines.core.config import ConfigError, parse_override
from tests.conftest import PYTHON, REPO, write_jsonl


def _recipe(tmp_path: Path, tiny_models, **extra) -> Path:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    data = {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "models": {"rw": {"engine": "vllm", "model": tiny_models["causal-lm"]}},
        "stages": {
            "ingest": {"paths": [str(corpus)]},
            "rewrite": {"model": "rw", "template": str(REPO / "configs/prompts/rewrite_to_prompts.yaml")},
        },
    }
    data.update(extra)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_are_typed_and_nested(tmp_path, tiny_models):
    path = _recipe(tmp_path, tiny_models)
    recipe = load_recipe(path, ["models.rw.batch_size=7", "models.rw.sampling.temperature=0.1",
                                "stages.rewrite.max_outputs=2", "cluster.num_cpus=1",
                                "models.rw.engine_kwargs={max_model_len: 512}"])
    assert recipe.models["rw"].batch_size == 7
    assert recipe.models["rw"].sampling.temperature == pytest.approx(0.1)
    assert recipe.stages.rewrite.max_outputs == 2
    assert recipe.cluster.num_cpus == 1
    assert recipe.models["rw"].engine_kwargs == {"max_model_len": 512}
    assert recipe.stages.ingest.format == "jsonl"  # inferred from the extension


def test_parse_override_values():
    assert parse_override("a.b=2e-5") == (["a", "b"], 2e-5)
    assert parse_override("a=[x, y]") == (["a"], ["x", "y"])
    assert parse_override("a=") == (["a"], "")
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_override("novalue")


@pytest.mark.parametrize("override, key, message", [
    ("models.rw.batch_size=abc", "models.rw.batch_size", "valid integer"),
    ("stages.rewrite.colour=red", "stages.rewrite.colour", "unknown key"),
    ("models.rw.model=/no/such/model", "models.rw.model", "model path does not exist"),
    ("stages.ingest.paths=[/no/such/file.jsonl]", "stages.ingest.paths.0", "file does not exist"),
    ("stages.rewrite.template=/no/such.yaml", "stages.rewrite.template", "file does not exist"),
    ("stages.rewrite.model=missing", "stages.rewrite.model", "not defined under models"),
    ("models.rw.engine=grpc", "models.rw.engine", "'vllm' or 'http'"),
])
def test_validation_errors_name_key_and_file(tmp_path, tiny_models, override, key, message):
    path = _recipe(tmp_path, tiny_models)
    with pytest.raises(ConfigError) as err:
        load_recipe(path, [override])
    text = str(err.value)
    assert str(path) in text
    assert key in text
    assert message in text


def test_http_endpoint_needs_url(tmp_path, tiny_models):
    path = _recipe(tmp_path, tiny_models)
    with pytest.raises(ConfigError, match="needs url"):
        load_recipe(path, ["models.rw.engine=http"])
    recipe = load_recipe(path, ["models.rw.engine=http", "models.rw.model=served-name",
                                "models.rw.url=http://127.0.0.1:1/v1/chat/completions"])
    assert recipe.models["rw"].model == "served-name"  # a served name is not a local path


def test_hf_ids_are_accepted_without_download(tmp_path, tiny_models):
    recipe = load_recipe(_recipe(tmp_path, tiny_models), ["models.rw.model=Qwen/Qwen3-8B"])
    assert recipe.models["rw"].model == "Qwen/Qwen3-8B"


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_cli_config_prints_resolved_recipe_and_fails_fast(tmp_path, tiny_models):
    path = _recipe(tmp_path, tiny_models)
    out = subprocess.run([PYTHON, "-m", "pipelines.cli", "config", str(path), "models.rw.batch_size=3"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    resolved = yaml.safe_load(out)
    assert resolved["models"]["rw"]["batch_size"] == 3
    assert resolved["models"]["rw"]["sampling"]["max_tokens"] == 256  # defaults are shown
    assert resolved["run_dir"] == str(tmp_path / "run")

    bad = subprocess.run([PYTHON, "-m", "pipelines.cli", "run", str(path), "cluster.bogus=1"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert "cluster.bogus: unknown key" in bad.stderr
    assert not (tmp_path / "run").exists()  # failed before any work


def test_demo_recipe_is_valid(tiny_models):
    demo = load_recipe(REPO / "configs/recipes/demo.yaml", [
        f"models.keyword_writer.model={tiny_models['causal-lm']}",
        f"models.rewriter.model={tiny_models['causal-lm']}", f"stages.embed.model={tiny_models['embedder']}",
        f"models.adjudicator.model={tiny_models['causal-lm']}",
        f"models.guard.model={tiny_models['causal-lm']}",
        f"models.baseline_guard.model={tiny_models['judge-2']}",
        f"stages.loop.classifier.model={tiny_models['causal-lm']}",
        f"stages.loop.generator_training.model={tiny_models['causal-lm']}",
        *(f"models.judge{i}.model={tiny_models[f'judge-{i}']}" for i in range(1, 5))])
    assert [name for name in demo.stages.listed() if getattr(demo.stages, name)] == [
        "keywords", "ingest", "seeds", "embed", "index", "retrieve", "rag", "pe", "preprocess", "jury",
        "adjudicate", "assemble", "loop", "guard_eval", "compare"]  # sections as listed: ties in the run order
    assert demo.stages.jury.judges == ["judge1", "judge2", "judge3", "judge4"]
    assert demo.stages.loop.systems == ["c0", "c2"] and demo.stages.loop.iterations == 2
    # our guard vs a baseline adapter on the test split and one external set
    guards = demo.stages.compare["guards"]
    assert guards.table_benchmarks == ["CHILLGuardTest", "WildGuardTest"] and len(guards.systems) == 3
    assert build_stages(demo)[-1].name == "compare_guards"


def test_loop_ablation_recipe_is_valid(tmp_path, tiny_models):
    model = tiny_models["causal-lm"]
    assembled = write_jsonl(tmp_path / "assembled.jsonl", [{"text": "x", "label": "safe", "split": "train"}])
    recipe = load_recipe(REPO / "configs/recipes/loop_ablation.yaml", [
        f"stages.seeds.assembled.paths=[{assembled}]", "stages.seeds.assembled.format=jsonl",
        *(f"models.{m}.model={model}" for m in ("generator", "guard")),
        *(f"stages.loop.{s}.model={model}" for s in ("classifier", "generator_training"))])
    assert recipe.stages.loop.systems == ["c0", "c1", "c2_dpo", "c2"]  # the seed's Table 3
    names = [s.name for s in build_stages(recipe)]
    assert {"loop0_eval_c0", "loop1_eval_c1", "loop2_eval_c2_dpo", "loop2_eval_c2", "loop_report"} <= set(names)


def test_paper_recipe_is_valid_offline():
    """Hub ids and cloud URIs are accepted without downloading or listing anything."""
    paper = load_recipe(REPO / "configs/recipes/chillguard_paper.yaml")
    assert paper.stages.embed.model == "BAAI/bge-m3"
    assert paper.models["rewriter"].model == "dphn/Dolphin-Mistral-24B-Venice-Edition"
    assert paper.stages.keywords.target_per_category * 31 == 2480
    assert paper.stages.retrieve.top_k == 100 and paper.stages.retrieve.sample == 5
    assert [paper.models[j].model for j in paper.stages.jury.judges] == [
        "Qwen/Qwen3-30B-A3B-Instruct-2507", "zai-org/GLM-4.7-Flash", "OpenGVLab/InternVL3_5-38B-Instruct",
        "01-ai/Yi-1.5-34B-Chat"]
    assert paper.models[paper.stages.adjudicate.model].engine == "http"
    assert paper.stages.assemble.external == ["seeds_polyguard_zh"]
    table2 = paper.stages.compare["paper"]  # Table 2's benchmarks, Table 1 on CHILLGuardTest
    assert (table2.table_benchmarks == ["CHILLGuardTest", "PolyG", "WildG", "ChineseS", "DNA", "SafetyP",
                                        "BeaverTails", "PolyG-R", "RXP_LX"]
            and table2.category_benchmark == "CHILLGuardTest")
    levels = {b: paper.stages.guard_eval[s.removeprefix("guard_eval_")].level
              for b, s in table2.systems["Llama-Guard-3-8B"].items()}
    assert [b for b, level in levels.items() if level == "response"] == ["BeaverTails", "PolyG-R", "RXP_LX"]
    loop = paper.stages.loop       # §4.3, Appendix D
    sft = loop.classifier          # Appendix D.3
    assert (sft.model, sft.learning_rate, sft.lr_scheduler, sft.warmup_ratio, sft.epochs) == (
        "Qwen/Qwen3-8B", 1e-5, "cosine", 0.1, 1)
    assert sft.deepspeed == "zero3" and sft.use_gpu
    generator = paper.models[loop.generator]  # Appendix D.2.2, Table 10
    assert (generator.model, loop.k, generator.sampling.temperature, generator.sampling.max_tokens,
            generator.max_model_len) == ("dphn/Dolphin3.0-Llama3.1-8B", 4, 0.7, 2048, 20480)
    mdpo = loop.generator_training  # Appendix D.2.1, Table 9
    assert (mdpo.model, mdpo.learning_rate, mdpo.global_batch_size, mdpo.beta, mdpo.gamma, mdpo.keep,
            mdpo.epochs, mdpo.lr_scheduler, mdpo.warmup_ratio) == (
        "dphn/Dolphin3.0-Llama3.1-8B", 2e-7, 16, 0.1, 0.9, 12, 1, "cosine", 0.1)


def test_stage_dependencies_are_checked(tmp_path, tiny_models):
    path = _recipe(tmp_path, tiny_models)
    with pytest.raises(ConfigError, match="stages.retrieve needs stages keywords, embed, index"):
        load_recipe(path, ["stages.retrieve={}"])
    with pytest.raises(ConfigError, match=r"sample \(500\) must not exceed top_k \(100\)"):
        load_recipe(path, ["stages.retrieve.sample=500", "stages.keywords={}",
                           f"stages.embed.model={tiny_models['embedder']}", "stages.index={}"])
    with pytest.raises(ConfigError, match="stages.keywords.model: 'gpt' is not defined under models"):
        load_recipe(path, ["stages.keywords.model=gpt"])
    with pytest.raises(ConfigError, match=r"stages.jury.judges\[1\]: 'nope' is not defined under models"):
        load_recipe(path, ["stages.jury.inputs=[ingest]", "stages.jury.judges=[rw, nope]"])
    with pytest.raises(ConfigError, match="judges must be distinct"):
        load_recipe(path, ["stages.jury.inputs=[ingest]", "stages.jury.judges=[rw, rw]"])
    with pytest.raises(ConfigError, match=r"stages.jury.inputs: \['pe'\] are not enabled row stages"):
        load_recipe(path, ["stages.jury.inputs=[rewrite, pe]", "stages.jury.judges=[rw]"])
    with pytest.raises(ConfigError, match="stages.jury.mode"):
        load_recipe(path, ["stages.jury.inputs=[ingest]", "stages.jury.judges=[rw]", "stages.jury.mode=parallel"])
    with pytest.raises(ConfigError, match="stages.adjudicate needs stages jury"):
        load_recipe(path, ["stages.adjudicate.model=rw"])


_HTTP = ["models.rw.engine=http", "models.rw.model=served-name", "models.rw.api_key_env=RW_KEY"]


@pytest.mark.parametrize("url", ["http://10.0.0.7:8000/v1/chat/completions",
                                 "http://api.example.com/v1/chat/completions",
                                 "http://127.0.0.1.example.com/v1/chat/completions",
                                 "http://[2001:db8::7]:8000/v1/chat/completions"])
def test_api_key_over_plain_http_to_another_host_is_refused(tmp_path, tiny_models, url):
    with pytest.raises(ConfigError) as err:
        load_recipe(_recipe(tmp_path, tiny_models), [*_HTTP, f"models.rw.url={url}"])
    text = str(err.value)
    assert "models.rw:" in text and url in text and "https://" in text and "RW_KEY" in text


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1/chat/completions",
                                 "http://127.8.9.10/v1/chat/completions",
                                 "http://localhost:8000/v1/chat/completions",
                                 "http://[::1]:8000/v1/chat/completions",
                                 "https://api.example.com/v1/chat/completions"])
def test_api_key_over_https_or_to_loopback_is_accepted(tmp_path, tiny_models, url):
    recipe = load_recipe(_recipe(tmp_path, tiny_models), [*_HTTP, f"models.rw.url={url}"])
    assert recipe.models["rw"].api_key_env == "RW_KEY"


def test_plain_http_without_a_key_is_accepted_and_a_key_needs_engine_http(tmp_path, tiny_models):
    path = _recipe(tmp_path, tiny_models)
    load_recipe(path, ["models.rw.engine=http", "models.rw.model=served-name",
                       "models.rw.url=http://10.0.0.7:8000/v1/chat/completions"])
    with pytest.raises(ConfigError, match="models.rw: .*api_key_env is only for engine: http"):
        load_recipe(path, ["models.rw.api_key_env=RW_KEY"])


def test_resolved_recipe_reads_back(tmp_path):
    """A run's ``recipe.yaml`` writes every default out; read back with ``resolved=True`` it is the
    same recipe (checks of keys an author may not set are for recipes as written)."""
    from pipelines.core.config import dump_recipe

    paper = load_recipe(REPO / "configs/recipes/chillguard_paper.yaml")
    path = tmp_path / "recipe.yaml"
    path.write_text(dump_recipe(paper))
    assert load_recipe(path, resolved=True).model_dump() == paper.model_dump()
    with pytest.raises(ConfigError, match="the loop sets each classifier's inputs"):
        load_recipe(path)  # as if an author had written classifier.inputs


def test_environment_variables_in_recipe_values(tmp_path, tiny_models, monkeypatch):
    """``${NAME}`` / ``${NAME:-default}`` come from the environment; an unset one without a default
    is named with its key."""
    folder = Path(tiny_models["causal-lm"])
    path = _recipe(tmp_path, tiny_models)
    data = yaml.safe_load(path.read_text())
    data["models"]["rw"]["model"] = "${MODELS_DIR:-" + str(folder.parent) + "}/" + folder.name
    data["run_dir"] = "${RUNS}/demo"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"run_dir: environment variable RUNS is not set"):
        load_recipe(path)
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    recipe = load_recipe(path)
    assert recipe.run_dir == str(tmp_path / "runs" / "demo") and recipe.models["rw"].model == str(folder)
    monkeypatch.setenv("MODELS_DIR", "/no/such/dir")
    with pytest.raises(ConfigError, match="models.rw.model: model path does not exist: /no/such/dir/causal-lm"):
        load_recipe(path)
