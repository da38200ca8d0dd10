"""Issue 28, item 9: every stage that renders the taxonomy (its codes and names) into a prompt or an
output has the taxonomy's content in its config hash, so a changed taxonomy recomputes it on resume
instead of keeping rows made with the old names. No Ray, no engine: hashes only."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import yaml

from pipelines.core.config import CONFIGS, LLMEndpoint
from pipelines.core.taxonomy import DEFAULT_TAXONOMY, load_taxonomy, taxonomy_digest

HTTP = LLMEndpoint(engine="http", model="m", url="http://127.0.0.1:1/v1/chat/completions")
PROMPTS = CONFIGS / "prompts"


@pytest.fixture(params=["micro_zh", "micro_en", "macro_zh"])
def renamed(request, tmp_path) -> str:
    """A copy of the default taxonomy with one category's name changed: a micro category's Chinese or
    English name, or a macro category's Chinese name."""
    data = yaml.safe_load(DEFAULT_TAXONOMY.read_text(encoding="utf-8"))
    level, lang = request.param.split("_")
    category = data["macros"][1]["micros"][2] if level == "micro" else data["macros"][1]
    category[lang] = category[lang] + ("（改）" if lang == "zh" else " (renamed)")
    path = tmp_path / f"taxonomy_{request.param}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def _rewrite_prompt(taxonomy: str):
    from pipelines.loop.generate import RewritePrompt

    return RewritePrompt(str(PROMPTS / "loop_rewrite_unsafe.yaml"), str(PROMPTS / "loop_rewrite_safe.yaml"), taxonomy)


def _generate(taxonomy: str):
    from pipelines.loop.generate import GenerateStage

    return GenerateStage("loop1_generate", inputs=("seeds_real",), endpoint=HTTP, prompt=_rewrite_prompt(taxonomy),
                         k=4, iteration=1, generator="G0", seed_split="train")


def _pairs(taxonomy: str):
    from pipelines.loop.pairs import PairsStage

    return PairsStage("loop2_pairs", inputs=("seeds_real",), scored="loop2_score", prompt=_rewrite_prompt(taxonomy),
                      seed=0, max_pairs=1, seed_split="train", iteration=2)


def _keywords(taxonomy: str):
    from pipelines.data.keywords import KeywordPoolStage, KeywordsConfig

    return KeywordPoolStage(KeywordsConfig(model="m"), HTTP, taxonomy)


def _pe(taxonomy: str):
    from pipelines.data.pe_rewrite import PEConfig, PERewriteStage

    return PERewriteStage(PEConfig(model="m", inputs=["seeds_real"]), HTTP, taxonomy, 0)


def _retrieve(taxonomy: str):
    from pipelines.data.embedding import EmbedConfig
    from pipelines.data.retrieval import RetrieveConfig, RetrieveStage

    return RetrieveStage(RetrieveConfig(), EmbedConfig(model="BAAI/bge-m3"), taxonomy, 0, "/tmp/unused-run")


def _assemble(taxonomy: str):
    from pipelines.labelling.assembly import AssembleConfig, AssembleStage

    return AssembleStage(AssembleConfig(inputs=["adjudicate"]), taxonomy, 0, {"judges": [], "adjudicator": None})


def _jury(taxonomy: str):
    from pipelines.labelling.jury import JuryConfig, JuryStage

    return JuryStage(JuryConfig(inputs=["near_dedup"], judges=["j"]), {"j": HTTP}, taxonomy)


def _adjudicate(taxonomy: str):
    from pipelines.labelling.jury import AdjudicateConfig, AdjudicateStage

    return AdjudicateStage(AdjudicateConfig(model="m"), HTTP, taxonomy)


def _guard_sft(taxonomy: str):
    from pipelines.training.sft import GuardSFTConfig, GuardSFTStage

    return GuardSFTStage(GuardSFTConfig(model="Qwen/Qwen3-0.6B"), taxonomy)


def _guard_eval(taxonomy: str):
    from pipelines.evaluation.guard_eval import GuardEvalConfig, GuardEvalStage

    # an adapter that is not ours: its prompt has no taxonomy, but its report names the categories
    return GuardEvalStage("x", GuardEvalConfig(inputs=["assemble"], model="g", adapter="qwen3guard_loose",
                                               score=False), HTTP, taxonomy)


#: stages that render taxonomy names: the loop's generator prompt (micro names), the keyword
#: expansion prompt (macro and micro names), PE rewriting (macro names), retrieval queries (macro
#: and micro names, and through the rows' labels the RAG rewriting prompt), the dataset card (all
#: names), the jury / adjudicator / guard prompts (codes and Chinese names)
STAGES: dict[str, Callable[[str], object]] = {
    "loop_generate": _generate, "loop_pairs": _pairs, "keywords": _keywords, "pe": _pe, "retrieve": _retrieve,
    "assemble": _assemble, "jury": _jury, "adjudicate": _adjudicate, "guard_sft": _guard_sft,
    "guard_eval": _guard_eval,
}
#: prompts with the Chinese names only (categories_block): an English name is not in them
ZH_ONLY = {"jury", "adjudicate"}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_renamed_micro_category_changes_the_hash(stage, renamed):
    if stage in ZH_ONLY and renamed.endswith("_en.yaml"):
        pytest.skip("renders the Chinese names only")
    make = STAGES[stage]
    assert make(str(DEFAULT_TAXONOMY)).config_hash() == make(str(DEFAULT_TAXONOMY)).config_hash()
    assert make(renamed).config_hash() != make(str(DEFAULT_TAXONOMY)).config_hash()


def test_the_taxonomy_digest_covers_codes_and_names_not_keywords(renamed, tmp_path):
    base = load_taxonomy(DEFAULT_TAXONOMY)
    assert taxonomy_digest(base) == taxonomy_digest(load_taxonomy(DEFAULT_TAXONOMY))
    assert taxonomy_digest(load_taxonomy(renamed)) != taxonomy_digest(base)
    # the seed keywords are the keyword pool's (its hash lists them): a new keyword regenerates no candidates
    data = yaml.safe_load(DEFAULT_TAXONOMY.read_text(encoding="utf-8"))
    data["macros"][0]["micros"][0]["keywords"][0] = "新关键词 | new keyword"
    path = tmp_path / "keywords.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    assert taxonomy_digest(load_taxonomy(path)) == taxonomy_digest(base)
    assert _generate(str(path)).config_hash() == _generate(str(DEFAULT_TAXONOMY)).config_hash()


def test_the_seeds_only_keyword_pool_renders_no_names(renamed):
    # without an endpoint the pool is the taxonomy's seed keywords: a renamed category changes nothing
    from pipelines.data.keywords import KeywordPoolStage, KeywordsConfig

    assert KeywordPoolStage(KeywordsConfig(), None, renamed).config_hash() == \
        KeywordPoolStage(KeywordsConfig(), None, str(DEFAULT_TAXONOMY)).config_hash()
