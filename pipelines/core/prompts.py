"""Prompt files: YAML with a ``system`` and a ``user`` Jinja template, rendered into chat messages.

Templates use StrictUndefined, so a template that names a column the rows do not have fails with the
variable's name instead of rendering an empty string. They render in Jinja's
``SandboxedEnvironment``: a template is recipe data, and access to Python internals
(``text.__class__``, ``str.format`` on attributes, ...) raises ``SecurityError`` in the worker
instead of running.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml


class ChatPrompt:
    def __init__(self, path: str | Path):
        self.path = str(path)
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        if not isinstance(data, dict) or "user" not in data:
            raise ValueError(f"prompt file {path} must be a mapping with 'user' (and optional 'system')")
        unknown = set(data) - {"system", "user"}
        if unknown:
            raise ValueError(f"prompt file {path}: unknown keys {sorted(unknown)}")
        self.system: str | None = data.get("system")
        self.user: str = data["user"]
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self._compiled = None

    def hash_payload(self) -> str:
        """What a config hash holds of the prompt: its file's content, as a digest (not its path)."""
        return self.digest

    def __getstate__(self):  # Jinja templates are not picklable; recompile in each worker
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    def _templates(self):
        if self._compiled is None:
            import jinja2
            from jinja2.sandbox import SandboxedEnvironment

            env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
            self._compiled = (env.from_string(self.system) if self.system else None,
                              env.from_string(self.user))
        return self._compiled

    def render(self, variables: dict[str, Any]) -> list[dict[str, str]]:
        system, user = self._templates()
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system.render(**variables).strip()})
        messages.append({"role": "user", "content": user.render(**variables).strip()})
        return messages


class RenderRow:
    """Row -> chat messages, with the row's columns as template variables."""

    def __init__(self, prompt: ChatPrompt, extra: dict[str, Any] | None = None):
        self.prompt = prompt
        self.extra = extra or {}

    def __call__(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return self.prompt.render({**row, **self.extra})


def prompt_token_ids(tokenizer, messages: list[dict[str, str]], chat_kwargs: dict[str, Any]) -> list[int]:
    """The model's chat template over ``messages``, opened for the assistant's answer, as token ids
    (the template writes the special tokens itself). Training's prompts, evaluation's and the served
    guard's are all made here, so they cannot drift apart."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **chat_kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
