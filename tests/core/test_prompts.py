"""Prompt templates: rendered in Jinja's sandbox, with strict variables."""

from __future__ import annotations

import pickle

import jinja2
import pytest
from jinja2.sandbox import SecurityError

from pipelines.core.prompts import ChatPrompt


def _prompt(tmp_path, user: str, system: str | None = None) -> ChatPrompt:
    path = tmp_path / "p.yaml"
    path.write_text(f"system: {system!r}\nuser: {user!r}\n" if system else f"user: {user!r}\n",
                    encoding="utf-8")
    return ChatPrompt(path)


def test_templates_render_rows_into_messages_and_survive_pickling(tmp_path):
    prompt = _prompt(tmp_path, "{% for v in votes %}{{ v.judge }}={{ v.verdict|upper }}{% if not loop.last %},"
                               "{% endif %}{% endfor %} {{ text }}", system="  审核 {{ lang }} ")
    messages = pickle.loads(pickle.dumps(prompt)).render(
        {"votes": [{"judge": "a", "verdict": "safe"}, {"judge": "b", "verdict": "unsafe"}],
         "text": "文本", "lang": "zh"})
    assert messages == [{"role": "system", "content": "审核 zh"},
                        {"role": "user", "content": "a=SAFE,b=UNSAFE 文本"}]
    with pytest.raises(jinja2.UndefinedError, match="'missing' is undefined"):
        _prompt(tmp_path, "{{ missing }}").render({"text": "x"})


@pytest.mark.parametrize("template", [
    "{{ text.__class__.__mro__ }}",                             # walk to object and its subclasses
    "{{ text.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",                        # a global's module namespace
    "{{ '{0.__class__}'.format(text) }}",                       # str.format reaching attributes
])
def test_unsafe_attribute_access_is_refused(tmp_path, template):
    """A template is data from a recipe; it must not reach Python internals in the workers."""
    with pytest.raises(SecurityError):
        _prompt(tmp_path, template).render({"text": "x"})


def test_every_shipped_template_renders_in_the_sandbox(tmp_path):
    """The repository's prompts use nothing the sandbox refuses (rendered with any variable set)."""
    from pathlib import Path

    import yaml

    from tests.conftest import REPO

    for path in sorted(Path(REPO / "configs/prompts").glob("*.yaml")):
        if "user" not in yaml.safe_load(path.read_text(encoding="utf-8")):
            continue  # not a chat prompt (shard_guidelines.yaml is the guidelines' text)
        prompt = ChatPrompt(path)
        variables = _variables(prompt)
        assert prompt.render(variables), path


def _variables(prompt: ChatPrompt) -> dict:
    """Values for the variables a template names: strings, and list/mapping shapes where it loops."""
    from jinja2 import meta
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment()
    names = set()
    for source in (prompt.system, prompt.user):
        if source:
            names |= meta.find_undeclared_variables(env.parse(source))
    row = {"judge": "j", "verdict": "safe", "text": "t", "code": "A1"}
    return {name: [row] if name.endswith("s") else "x" for name in names}
