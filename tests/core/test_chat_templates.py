"""A model without a chat template (a base model): the recipe names one, or the recipe fails with a
line naming the key and the model before Ray starts; training saves the template with the trained model."""

import json
import shutil

import pytest
import yaml

from pipelines.construction import load_recipe
from pipelines.core.chat_templates import folder_has_chat_template, load_tokenizer, resolve_chat_template
from pipelines.core.config import ConfigError, LLMEndpoint, TrainingConfig
from pipelines.core.prompts import prompt_token_ids
from tests.conftest import PYTHON, REPO

MESSAGES = [{"role": "system", "content": "你是审核员。"}, {"role": "user", "content": "这句话安全吗？"}]


@pytest.fixture(scope="module")
def base_model(tiny_models, tmp_path_factory) -> str:
    """The tiny causal LM with its chat template taken out, as a base model ships."""
    folder = tmp_path_factory.mktemp("base") / "base-lm"
    shutil.copytree(tiny_models["causal-lm"], folder)
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    assert not folder_has_chat_template(folder)
    return str(folder)


def test_named_formats_render_the_turn_markers(tiny_models):
    tok = load_tokenizer(tiny_models["causal-lm"], resolve_chat_template("chatml"))
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\n你是审核员。<|im_end|>\n<|im_start|>user\n这句话安全吗？<|im_end|>\n"
        "<|im_start|>assistant\n")
    tok.chat_template = resolve_chat_template("gemma")
    tok.bos_token = "<bos>"
    # Gemma has no system role: the system text opens the first user turn
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\n你是审核员。\n\n这句话安全吗？<end_of_turn>\n<start_of_turn>model\n")
    tok.chat_template = resolve_chat_template("plain")
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        "System: 你是审核员。\n\nUser: 这句话安全吗？\n\nAssistant:\n")


def test_a_template_is_a_name_a_file_or_inline_jinja(tmp_path):
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(inline) == inline
    (tmp_path / "mine.jinja").write_text(inline)
    assert resolve_chat_template(str(tmp_path / "mine.jinja")) == inline
    assert "<start_of_turn>" in resolve_chat_template("gemma")
    with pytest.raises(ValueError, match=r"'vicuna' is neither a named format \(chatml, gemma, llama3, plain\)"):
        resolve_chat_template("vicuna")


def test_a_base_model_without_a_template_is_refused_naming_it(base_model):
    with pytest.raises(ValueError, match=f"model {base_model} has no chat template: set chat_template"):
        LLMEndpoint(engine="vllm", model=base_model)
    with pytest.raises(ValueError, match=f"model {base_model} has no chat template"):
        TrainingConfig(model=base_model)
    with pytest.raises(ValueError, match=f"model {base_model} has no chat template"):
        load_tokenizer(base_model)
    endpoint = LLMEndpoint(engine="vllm", model=base_model, chat_template="chatml")
    assert endpoint.chat_template == resolve_chat_template("chatml")  # held as text: hashes follow it
    with pytest.raises(ValueError, match="chat_template is only for engine: vllm"):
        LLMEndpoint(engine="http", model="m", url="http://127.0.0.1:1/v1/chat/completions", chat_template="chatml")


def test_the_recipe_error_is_one_line_before_ray(base_model, tmp_path):
    import subprocess

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    recipe = {"name": "t", "run_dir": str(tmp_path / "run"),
              "models": {"rw": {"engine": "vllm", "model": base_model}},
              "stages": {"ingest": {"paths": [str(corpus)]},
                         "rewrite": {"model": "rw",
                                     "template": str(REPO / "configs/prompts/rewrite_to_prompts.yaml")}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="models.rw"):
        load_recipe(path)
    assert load_recipe(path, ["models.rw.chat_template=gemma"]).models["rw"].chat_template.startswith("{#-")
    run = subprocess.run([PYTHON, "-m", "pipelines.cli", "run", str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()  # the recipe, then one line per problem
    assert len(lines) == 2 and lines[0] == f"error: invalid recipe {path}:", run.stderr
    assert lines[1].strip().startswith(f"models.rw: model {base_model} has no chat template"), run.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_training_uses_the_recipe_template_and_saves_it(base_model, tmp_path):
    from pipelines.training.sft import SFT, GuardSFTConfig, TokenizeGuardRows

    config = GuardSFTConfig(model=base_model, chat_template="chatml")
    tokenize = TokenizeGuardRows(config, str(REPO / "configs/taxonomy.yaml"))
    tokenize.setup()
    row = tokenize.row({"id": "r1", "text": "怎么做蛋糕？", "label": "safe", "micro": "", "split": "train",
                        "response": ""})
    assert row["status"] == "ok"
    prompt = tokenize.tok.decode(row["input_ids"][:row["prompt_len"]])
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    assert row["input_ids"][:row["prompt_len"]] == prompt_token_ids(
        load_tokenizer(base_model, config.chat_template),
        tokenize.render({"text": "怎么做蛋糕？", "response": ""}), {})

    SFT(config).export_tokenizer(str(tmp_path / "trained"))
    assert folder_has_chat_template(tmp_path / "trained")  # a trained guard evaluates with no setting
    assert load_tokenizer(str(tmp_path / "trained")).chat_template == config.chat_template
