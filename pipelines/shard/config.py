"""SHARD data construction settings (``stages.shard``): the config models, and the names of the
stages every variant shares.

:class:`ShardConfig` holds the endpoints (target, judge, rules writer), the prompt templates and the
knobs of every ``shard_*`` data stage and says which stages a recipe gets (:meth:`ShardConfig.row_stages`);
:class:`ShardVariant` is one supervision variant (``stages.shard.variants.<name>``), :class:`ShardSplits`
the split shares.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.core.config import CONFIGS, ExistingPath, LLMEndpoint, Strict, names_matching
from pipelines.shard.categories import CATEGORY_MAPS
from pipelines.shard.pairwise import SELECTION_RULES, VERDICT_PICKS
from pipelines.shard.reframing import GUIDELINE_MODES
from pipelines.training.system_prompts import ANSWER_SYSTEM, TRAIN_SYSTEM

SPLIT, ANSWER = "shard_split", "shard_answer"
#: how a variant writes O2: SHARD's reframing + refinement, or one of its inference-time baselines
#: that answer P1 directly under a system prompt (no reframing): benign-intent prompting and Rational
REFRAME, BENIGN_INTENT, RATIONAL = "reframe", "benign_intent", "rational"
METHODS = (REFRAME, BENIGN_INTENT, RATIONAL)


class SamplingOverride(Strict):
    """Sampling settings a SHARD step uses whatever its endpoint says (unset: the endpoint's)."""

    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)

    def on(self, endpoint: LLMEndpoint) -> LLMEndpoint:
        """``endpoint`` with these settings in its sampling."""
        update = self.model_dump(exclude_none=True)
        if not update:
            return endpoint
        return endpoint.model_copy(update={"sampling": endpoint.sampling.model_copy(update=update)})


def with_sampling(endpoint: LLMEndpoint, sampling: SamplingOverride | None) -> LLMEndpoint:
    """``endpoint`` with ``sampling`` applied (``None``: as it is)."""
    return endpoint if sampling is None else sampling.on(endpoint)


#: SHARD's data-construction generations (O1, the teacher's drafts, the construction judge) go through
#: its model_client's vLLM path: SamplingParams(temperature=max(0.1, t), top_p=0.9, repetition_penalty=1.1)
SHARD_CLIENT = {"top_p": 0.9, "repetition_penalty": 1.1}


class ShardSplits(Strict):
    """Shares of each stratum (dataset × harm level) per split; SHARD's 72 / 8 / 20."""

    train: float = Field(0.72, ge=0, le=1)
    val: float = Field(0.08, ge=0, le=1)
    test: float = Field(0.20, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> ShardSplits:
        total = self.train + self.val + self.test
        if abs(total - 1) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self


class ShardVariant(Strict):
    """One supervision variant (``stages.shard.variants.<name>``): how O2 is written (``method``), who
    writes P2 and O2, whose draft O1 it refines and is judged against, and which guidance the reframing
    prompt carries (the ablations)."""

    method: Literal[METHODS] = Field(
        REFRAME, description="reframe: P1 -> P2 -> O1 refined into O2 (SHARD); benign_intent: O2 = the "
        "answer to P1 under a system prompt that assumes a benign purpose (SHARD's benign-intent baseline); "
        "rational: O2 = the final answer after Self-Check reasoning (the Rational baseline, arXiv 2503.05021, "
        "as SHARD runs it); the last two have no P2, no refinement and no relevance judgement")
    reframer: str | None = Field(
        None, description="endpoint under `models:` that writes P2 and O2; default: the target itself "
        "(self-reframing, SHARD); a larger model = the teacher-distillation baseline")
    draft: Literal["own", "target"] = Field(
        "own", description="whose O1 the reframer refines and O2 is judged against: own = the reframer "
        "answers the prompts itself first (SHARD's teacher baseline; the same as target for self); "
        "target = the teacher refines the target's drafts")
    guidelines: Literal[GUIDELINE_MODES] = Field(
        "full", description="full: universal guidelines + category rules; universal_only; "
        "instructions_only: the task instructions alone")

    @model_validator(mode="after")
    def _reframing_settings(self) -> ShardVariant:
        if self.method != REFRAME:
            given = sorted({"draft", "guidelines"} & self.model_fields_set)
            if given:
                raise ValueError(f"{given} apply to method reframe only (method {self.method} answers P1 "
                                 "directly: there is no draft to refine and no reframing prompt)")
        return self


class ShardConfig(Strict):
    """SHARD data construction (``pipelines/shard/``): split, baseline answers O1, category rules,
    reframing P1 -> P2 (JSON), refinement O1 -> O2, pairwise judge, selection; per variant.

    One section for every SHARD stage: a stage keeps the settings of it that it uses as attributes of its
    own (they are its config hash), not the section, so a change to one variant or to the judge
    recomputes the stages that use it alone."""

    inputs: list[str] = Field(min_length=1, description="row stages with the sensitive prompts "
                              "(seeds_<key>: do_not_answer / linguasafe presets or any mapping)")
    target: str = Field(description="endpoint under `models:`: the model being improved (answers O1)")
    judge: str = Field(description="endpoint under `models:`: the pairwise judge")
    variants: dict[str, ShardVariant] = Field(
        default_factory=lambda: {"self": ShardVariant()}, min_length=1,
        description="name -> variant; each gives stages shard_{rules,reframe,refine,judge,select}_<name>")
    system: str | None = Field(
        ANSWER_SYSTEM, description="system prompt of O1 and of the evaluated answers (SHARD's)")
    train_system: str | None = Field(
        TRAIN_SYSTEM, description="system prompt SFT on shard_select_* trains under (checked against "
        "stages.sft.<key>.system); SHARD's 'helpful and safe assistant' prompt, which differs from `system` "
        "as in SHARD's jobs; null = the same as `system`")
    answer_sampling: SamplingOverride | None = Field(
        default_factory=lambda: SamplingOverride(temperature=0.3, **SHARD_CLIENT),
        description="sampling of O1 (the target's and a teacher's own drafts), whatever the endpoint's: "
        "SHARD's temperature 0.3, top_p 0.9, repetition penalty 1.1; null = the endpoint's")
    judge_sampling: SamplingOverride | None = Field(
        default_factory=lambda: SamplingOverride(temperature=0.1, **SHARD_CLIENT),
        description="sampling of the judge in shard_judge_<v> (SHARD's construction judge: temperature 0.1, "
        "top_p 0.9, repetition penalty 1.1); null = the endpoint's")
    splits: ShardSplits = Field(default_factory=ShardSplits)
    select: Literal[SELECTION_RULES] = Field(
        "helpfulness", description="which O2 are kept for SFT: helpfulness = O2 wins helpfulness (SHARD); "
        "helpfulness_and_harm = and does not lose harmfulness")
    order_seed: int = Field(42, description="seed of the judge's A/B order draws")
    split_seed: int = Field(42, description="seed of the train / val / test split (SHARD: 42)")
    guidelines: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_guidelines.yaml"), validate_default=True)
    rules_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_rules.yaml"), validate_default=True)
    reframe_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_reframe.yaml"),
                                           validate_default=True)
    refine_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_refine.yaml"), validate_default=True)
    helpfulness_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_judge_helpfulness.yaml"),
                                               validate_default=True)
    harmfulness_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_judge_harmfulness.yaml"),
                                               validate_default=True)
    category_map: str | dict[str, str] = Field(
        "do_not_answer_to_linguasafe", description="harm category -> the category whose rules a row gets: "
        "do_not_answer_to_linguasafe = Do-Not-Answer's 12 types share LinguaSafe's 5 types' rules (SHARD: one "
        "rule set); none = every dataset's own categories; or a mapping (unmapped categories keep their name)")
    rules_temperature: float | None = Field(
        0.2, ge=0, description="sampling temperature of the rules writer (SHARD: 0.2), whatever the endpoint's; "
        "null = the endpoint's")
    benign_intent_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_benign_intent.yaml"),
                                                 validate_default=True)
    rational_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_rational.yaml"), validate_default=True)
    relevance: bool = Field(
        True, description="judge topic drift of every reframed variant (SHARD's relevance judge): is O2 more "
        "relevant to P1, to P2 or equally (column relevance: p1 / p2 / equal)")
    relevance_template: ExistingPath = Field(str(CONFIGS / "prompts" / "shard_judge_relevance.yaml"),
                                             validate_default=True)
    rules_writer: str | None = Field(
        None, description="endpoint under `models:` that writes the category rules once for every variant "
        "(SHARD: one strong model); default: the target")
    rules_examples: int = Field(
        0, ge=0, description="example prompts of the category shown when writing its rules, from the train "
        "split only; 0 = the category name alone (SHARD)")
    retries: int = Field(0, ge=0, description="re-asks after a reframing answer that is not valid JSON P2 "
                         "(SHARD: none)")
    invalid_p2: Literal["raw", "error"] = Field(
        "raw", description="a reframing answer that is still not valid JSON P2: raw = its text (code fences and "
        "quotes removed) is P2 with no response mode (SHARD); error = an error row")
    rewrite_temperature: float | None = Field(
        0.3, ge=0, description="sampling temperature of reframing and refinement (SHARD: 0.3), whatever the "
        "reframer endpoint's; null = the endpoint's")
    constrained: bool = Field(
        False, description="on endpoints that accept structured outputs: P2 restricted to its JSON schema, "
        "judge answers to explanation + verdict (SHARD: off)")
    verdict: Literal[VERDICT_PICKS] = Field(
        "first", description="which [[X]] of a judge answer is the verdict: first (SHARD's re.search) or last")
    max_field_chars: int = Field(2000, ge=8, description="constrained P2: longest string field")
    explanation_chars: int = Field(1000, ge=0, description="constrained judge: longest explanation")
    position_check: int = Field(
        0, ge=0, description="judge this many judged rows (a seeded sample) again with the answers swapped and "
        "report the share of outcomes that flip (shard_judge_<v>/position_check.json; 0 = off)")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, ShardVariant]) -> dict[str, ShardVariant]:
        return names_matching(value, r"[a-z0-9_]+", "variant names are stage-name suffixes")

    @field_validator("category_map")
    @classmethod
    def _category_map(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(value, str) and value not in CATEGORY_MAPS:
            raise ValueError(f"one of {sorted(CATEGORY_MAPS)} or a mapping {{category: rules category}}, "
                             f"got {value!r}")
        return value

    def method(self, variant: str) -> str:
        return self.variants[variant].method

    def o2_stage(self, variant: str) -> str:
        """The stage whose rows hold ``variant``'s O2 (``completion``): ``shard_refine_<v>`` after
        reframing, ``shard_prompt_<v>`` for the prompting baselines."""
        return f"shard_refine_{variant}" if self.method(variant) == REFRAME else f"shard_prompt_{variant}"

    def reframer(self, variant: str) -> str:
        """The endpoint that reframes and refines for ``variant``."""
        return self.variants[variant].reframer or self.target

    def answer_stage(self, variant: str) -> str:
        """The stage holding the O1 that ``variant`` refines (or, for a prompting baseline, is judged
        against): ``shard_answer`` (the target's), or ``shard_answer_<v>`` for a teacher that refines its
        own drafts."""
        if (self.method(variant) == REFRAME and self.variants[variant].draft == "own"
                and self.reframer(variant) != self.target):
            return f"{ANSWER}_{variant}"
        return ANSWER

    def row_stages(self) -> list[str]:
        """Its stages whose rows later stages read, in run order (the rules stage's rows are categories)."""
        names = ["shard_split", "shard_answer"]
        for v in self.variants:
            names += [self.answer_stage(v)] if self.answer_stage(v) != ANSWER else []
            steps = ("reframe", "refine") if self.method(v) == REFRAME else ("prompt",)
            names += [f"shard_{step}_{v}" for step in (*steps, "judge", "select")]
        return names
