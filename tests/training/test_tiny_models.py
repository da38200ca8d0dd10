import json

from pipelines.training.tiny_models import build_tiny_models


def test_tiny_models_are_deterministic_and_loadable(tmp_path, tiny_models):
    again = build_tiny_models(tmp_path / "again")
    first = json.loads((__import__("pathlib").Path(tiny_models["causal-lm"]).parent / "tiny_models.json").read_text())
    second = json.loads((tmp_path / "again" / "tiny_models.json").read_text())
    assert {k: v["digest"] for k, v in first["models"].items()} == \
        {k: v["digest"] for k, v in second["models"].items()}

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(again["causal-lm"])
    assert tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "你好 hello"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("网络安全 safety")["input_ids"]) == "网络安全 safety"
    config = AutoConfig.from_pretrained(again["causal-lm"])
    assert config.head_dim >= 64 and config.model_type == "qwen3"
    cls = AutoModelForSequenceClassification.from_pretrained(again["seq-cls"])
    assert cls.config.id2label == {0: "safe", 1: "unsafe"}
    assert set(first["models"]) == {"causal-lm", "seq-cls", "marian", "judge-1", "judge-2", "judge-3", "judge-4"}
    judges = [AutoConfig.from_pretrained(again[f"judge-{i}"]) for i in range(1, 5)]
    assert all(j.model_type == "qwen3" and j.head_dim >= 64 for j in judges)
    assert len({first["models"][f"judge-{i}"]["digest"] for i in range(1, 5)}) == 4  # other seeds

    from transformers import AutoModelForSeq2SeqLM

    marian = AutoModelForSeq2SeqLM.from_pretrained(again["marian"])
    assert marian.config.model_type == "marian"
    assert AutoTokenizer.from_pretrained(again["marian"]).padding_side == "right"
    assert (tmp_path / "again" / "embedder" / "modules.json").is_file()  # the offline MiniLM
