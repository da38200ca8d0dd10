"""The shipped taxonomy and the validation of taxonomy files."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipelines.core.taxonomy import DEFAULT_TAXONOMY, TaxonomyError, load_taxonomy


def test_shipped_taxonomy_shape():
    tax = load_taxonomy()
    assert tax.macro_codes == ["A", "B", "C", "D", "E"]
    assert len(tax.micro_codes) == 31
    assert [len(m.micros) for m in tax.macros] == [8, 9, 5, 7, 2]
    for code in tax.micro_codes:
        seeds = tax.seed_keywords(code)
        assert len(seeds) == 20, code
        assert all(kw.zh and kw.en for kw in seeds)
    assert tax.micro("D5").zh == "侵害他人隐私权"
    assert tax.macro("C").en.startswith("Commercial")
    assert tax.macro_of("B3") == "B" and tax.macro("B3").code == "B"
    assert tax.micro("A1").label("en").startswith("Inciting subversion")


def test_unknown_codes_are_named():
    tax = load_taxonomy()
    with pytest.raises(TaxonomyError, match="unknown micro category 'F1'"):
        tax.micro("F1")
    with pytest.raises(TaxonomyError, match="unknown category 'Z'"):
        tax.macro("Z")


def _write(tmp_path, data) -> str:
    path = tmp_path / "tax.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def shipped():
    return yaml.safe_load(DEFAULT_TAXONOMY.read_text(encoding="utf-8"))


def test_micro_under_wrong_macro(tmp_path, shipped):
    data = copy.deepcopy(shipped)
    data["macros"][1]["micros"][0]["code"] = "C9"
    with pytest.raises(TaxonomyError, match="micro code 'C9' is not under macro 'B'"):
        load_taxonomy(_write(tmp_path, data))


def test_duplicate_codes(tmp_path, shipped):
    data = copy.deepcopy(shipped)
    data["macros"][0]["micros"][1]["code"] = "A1"
    with pytest.raises(TaxonomyError, match=r"duplicate codes: \['A1'\]"):
        load_taxonomy(_write(tmp_path, data))


def test_wrong_category_count(tmp_path, shipped):
    data = copy.deepcopy(shipped)
    data["macros"][4]["micros"].pop()
    with pytest.raises(TaxonomyError, match="expected 5 macro and 31 micro categories, found 5 and 30"):
        load_taxonomy(_write(tmp_path, data))


def test_bad_keywords(tmp_path, shipped):
    data = copy.deepcopy(shipped)
    data["macros"][0]["micros"][0]["keywords"][0] = "只有中文"
    with pytest.raises(TaxonomyError, match="is not 'Chinese | English'"):
        load_taxonomy(_write(tmp_path, data))
    data = copy.deepcopy(shipped)
    kws = data["macros"][0]["micros"][0]["keywords"]
    kws[1] = kws[0]
    with pytest.raises(TaxonomyError, match="duplicate keyword"):
        load_taxonomy(_write(tmp_path, data))


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(TaxonomyError, match="does not exist"):
        load_taxonomy(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("macros: [", encoding="utf-8")
    with pytest.raises(TaxonomyError, match="not valid YAML"):
        load_taxonomy(str(bad))
