"""The mapping of our micro codes onto OpenAI's moderation categories: the shipped file, and bad files
as one-line errors naming the code (pure: no Ray)."""

from __future__ import annotations

import re
import typing

import pytest
import yaml

from pipelines.core.config import CONFIGS, ConfigError, validate_settings
from pipelines.core.taxonomy import load_taxonomy
from pipelines.serve.openai_mapping import (
    DEFAULT_OPENAI_MAPPING,
    OPENAI_CATEGORIES,
    OPENAI_MODELS,
    OpenAIMappingError,
    load_openai_mapping,
    parse_openai_mapping,
)

TAXONOMY = load_taxonomy()
MAPPING = load_openai_mapping(DEFAULT_OPENAI_MAPPING, TAXONOMY.micro_codes)


def test_every_micro_code_is_mapped_with_a_reason():
    assert list(MAPPING.targets) == TAXONOMY.micro_codes and len(MAPPING.targets) == 31
    for code, targets in MAPPING.targets.items():
        assert set(targets) <= set(OPENAI_CATEGORIES), code
        assert MAPPING.why[code] and "\n" not in MAPPING.why[code], code
        # a subcategory (hate/threatening, illicit/violent, ...) only with its parent
        for target in targets:
            assert "/" not in target or target.split("/")[0] in targets, (code, target)
    # the codes no OpenAI category covers, as docs/serving.md lists them: they answer `unspecified`
    assert {code for code, targets in MAPPING.targets.items() if not targets} == {"A7", "E1", "E2"}
    assert MAPPING.codes_of("hate") == ["A5", "B1", "B2", "B3", "B5", "B8"]


def test_the_docs_table_is_the_mapping():
    """docs/serving.md's table of OpenAI categories and the codes that count in them says what the file says."""
    text = (CONFIGS.parent / "docs" / "serving.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([a-z/-]+)` \| ([A-E][0-9](?:, [A-E][0-9])*) \|$", text, re.M))
    assert {k: v.split(", ") for k, v in rows.items()} == \
        {k: MAPPING.codes_of(k) for k in OPENAI_CATEGORIES if MAPPING.codes_of(k)}
    (none,) = [line for line in text.splitlines() if line.startswith("| `") and "| none" in line]
    unused = [k for k in OPENAI_CATEGORIES if not MAPPING.codes_of(k)]
    assert re.findall(r"`([a-z/-]+)`", none.split(" | ")[0]) == unused


def test_openai_names_are_the_clients_own():
    """The 13 categories and the model names as the `openai` client types them."""
    moderation = pytest.importorskip("openai.types.moderation")
    from openai.types.moderation_model import ModerationModel

    for model in (moderation.Categories, moderation.CategoryScores, moderation.CategoryAppliedInputTypes):
        names = [field.alias or name for name, field in model.model_fields.items()]
        assert names == list(OPENAI_CATEGORIES), model.__name__
    assert set(typing.get_args(ModerationModel)) == set(OPENAI_MODELS)


def _data() -> dict:
    return yaml.safe_load(DEFAULT_OPENAI_MAPPING.read_text(encoding="utf-8"))


def _without_b3(data: dict) -> None:
    del data["codes"]["B3"]


@pytest.mark.parametrize("change,message", [
    (_without_b3, "m.yaml: micro code B3 is not mapped"),
    (lambda d: d["codes"]["B3"].update(openai=["hateful"]),
     "m.yaml: B3: 'hateful' is not an OpenAI moderation category"),
    (lambda d: d["codes"].update(Z9={"openai": [], "why": "x"}), "m.yaml: Z9 is not a micro code of the taxonomy"),
    (lambda d: d["codes"]["B3"].pop("why"), "m.yaml: B3 needs exactly `openai` and `why` (got openai)"),
    (lambda d: d["codes"]["B3"].update(why="  "), "m.yaml: B3: `why` must be one non-empty line"),
    (lambda d: d["codes"]["B3"].update(openai=["hate", "hate"]), "m.yaml: B3: a category is listed twice"),
    (lambda d: d["codes"]["B3"].update(openai="hate"), "m.yaml: B3: `openai` must be a list"),
    (lambda d: d.update(extra=1), "m.yaml: unknown top-level key(s) extra"),
    (lambda d: d.pop("codes"), "m.yaml: expected a mapping `codes:`"),
])
def test_a_bad_mapping_is_one_line_naming_the_code(tmp_path, change, message):
    data = _data()
    change(data)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(OpenAIMappingError) as err:
        load_openai_mapping(path, TAXONOMY.micro_codes)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_or_broken_files(tmp_path):
    assert parse_openai_mapping(_data(), TAXONOMY.micro_codes, "m.yaml") == MAPPING
    with pytest.raises(OpenAIMappingError, match="^m.yaml: expected a mapping"):
        parse_openai_mapping(["A1"], TAXONOMY.micro_codes, "m.yaml")
    with pytest.raises(OpenAIMappingError, match="does not exist"):
        load_openai_mapping(tmp_path / "none.yaml", TAXONOMY.micro_codes)
    broken = tmp_path / "broken.yaml"
    broken.write_text("codes: [unclosed\n", encoding="utf-8")
    with pytest.raises(OpenAIMappingError, match="not valid YAML") as err:
        load_openai_mapping(broken, TAXONOMY.micro_codes)
    assert "\n" not in str(err.value)


def test_the_serve_settings_check_the_mapping_and_the_names(tmp_path):
    """A bad mapping or a served name that is also an OpenAI model name fails the settings, before Ray."""
    from pipelines.serve.config import GuardServeConfig

    settings = {"model": "Qwen/Qwen3-8B"}
    config = validate_settings(GuardServeConfig, settings, "s")
    assert config.categories == "chillguard" and config.openai_models == list(OPENAI_MODELS)
    data = _data()
    _without_b3(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError, match="micro code B3 is not mapped"):
        validate_settings(GuardServeConfig, {**settings, "openai_mapping": str(bad)}, "s")
    with pytest.raises(ConfigError, match="'omni-moderation-latest' is one of openai_models"):
        validate_settings(GuardServeConfig, {**settings, "name": "omni-moderation-latest"}, "s")
    with pytest.raises(ConfigError, match="categories"):
        validate_settings(GuardServeConfig, {**settings, "categories": "llamaguard"}, "s")
    aliased = validate_settings(GuardServeConfig, {**settings, "categories": "openai",
                                                   "openai_models": ["moderation"]}, "s")
    assert (aliased.categories, aliased.openai_models) == ("openai", ["moderation"])
