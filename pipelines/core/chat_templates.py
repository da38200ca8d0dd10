"""Chat templates: the model's own, or one the recipe gives for a model that has none.

Every prompt the project sends to a model or trains on goes through the tokenizer's chat template
(``pipelines.core.prompts.prompt_token_ids``). Base models (Gemma 3 270M, the Qwen3 and Llama 3
bases that guards are fine-tuned from) ship without one, so a recipe names one:

    chat_template: gemma                         # configs/chat_templates/gemma.jinja
    chat_template: configs/my_format.jinja       # a Jinja file
    chat_template: "{% for m in messages %}..."  # inline Jinja, as tokenizer_config.json holds it

The recipe's template wins over the model's own when both exist. A trained model's folder is saved
with the template it was trained with, so evaluating or serving it needs no setting.
"""

from __future__ import annotations

import json
from pathlib import Path

#: named formats: configs/chat_templates/NAME.jinja (config.py imports this module: no import back)
TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "configs" / "chat_templates"


def named_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def resolve_chat_template(value: str) -> str:
    """A template name, a Jinja file or inline Jinja -> the template's text (so a run's hash follows
    the text, not the file name). Inline text is recognised by its Jinja markers."""
    if "{{" in value or "{%" in value:
        return value
    named = TEMPLATES_DIR / f"{value}.jinja"
    path = named if named.is_file() else Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"chat_template {value!r} is neither a named format ({', '.join(named_templates())}), "
                         "a Jinja file nor inline Jinja")
    return path.read_text(encoding="utf-8")


def folder_has_chat_template(folder: str | Path) -> bool:
    """Whether a local model folder carries a chat template (``tokenizer_config.json``'s
    ``chat_template``, or ``chat_template.jinja`` / ``chat_template.json`` beside it)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))


def missing_template_error(model: str) -> str:
    return (f"model {model} has no chat template: set chat_template to a named format "
            f"({', '.join(named_templates())}), a .jinja file or inline Jinja")


def check_chat_template(model: str, chat_template: str | None) -> None:
    """Raise (one line, naming the model) when a local model folder has no chat template and the
    recipe gives none. A hub id is not checked here (its files may not be on this machine); loading
    its tokenizer checks it (:func:`load_tokenizer`)."""
    if chat_template is None and Path(model).is_dir() and not folder_has_chat_template(model):
        raise ValueError(missing_template_error(model))


def load_tokenizer(model: str, chat_template: str | None = None):
    """``AutoTokenizer`` of ``model`` with the recipe's template (resolved text) when given; a
    tokenizer left without any template is an error naming the model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ValueError(missing_template_error(model))
    return tokenizer
