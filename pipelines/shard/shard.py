"""SHARD data construction (self-reframing distillation, REFERENCE.md "SHARD facts"): the stage
section ``shard``, its stages in run order and its reference checks.

Stages, in run order (``stages.shard`` in a recipe, :mod:`pipelines.shard.config`; ``<v>`` is a
variant of ``stages.shard.variants``):

``shard_split``
    the prompts of ``inputs``, split train / val / test per stratum (:mod:`pipelines.shard.split`).
``shard_answer``
    the target model's baseline answer O1 to P1 (:mod:`pipelines.shard.answer`).
``shard_rules``
    (when a variant uses guidelines ``full``) category-specific rules, once per run, shared by every
    variant (:mod:`pipelines.shard.rules`).
``shard_reframe_<v>``, ``shard_refine_<v>``
    P1 -> P2 (JSON), then O1 -> O2 (:mod:`pipelines.shard.rewriting`).
``shard_prompt_<v>``
    instead of reframing and refinement, for the inference-time baselines (``method: benign_intent`` /
    ``rational``): O2 = the answer to P1 under the method's system prompt (:mod:`pipelines.shard.prompting`).
``shard_judge_<v>``
    O2 (candidate) against O1 (reference), helpfulness and harmfulness, and for a reframed variant
    SHARD's relevance verdict (:mod:`pipelines.shard.judging`).
``shard_select_<v>``
    the O2 kept for ``sft_<key>`` (:mod:`pipelines.shard.selection`).

Variants: ``reframer`` unset = the target reframes and refines itself (SHARD); a larger endpoint =
the teacher-distillation baseline, which (``draft: own``, SHARD's) first answers the prompts itself
in ``shard_answer_<v>``, then reframes, refines **its own** O1 and is judged against it; ``draft:
target`` makes it refine the target's O1 instead. ``guidelines`` = full / universal_only / instructions_only.
Every row is carried with one fixed schema (:mod:`pipelines.shard.rows`).
"""

from __future__ import annotations

from typing import Any

from pipelines.core.registry import References, register
from pipelines.core.stage import Stage
from pipelines.shard.answer import ShardAnswerStage
from pipelines.shard.config import ANSWER, REFRAME, ShardConfig
from pipelines.shard.judging import ShardJudgeStage
from pipelines.shard.prompting import ShardPromptStage
from pipelines.shard.rewriting import ShardRefineStage, ShardReframeStage, rewriting_endpoint
from pipelines.shard.rules import ShardRulesStage
from pipelines.shard.selection import ShardSelectStage
from pipelines.shard.split import ShardSplitStage


def shard_stages(recipe: Any, config: ShardConfig) -> list[Stage]:
    """The data stages of ``stages.shard``, in run order (before ``sft_<key>``)."""
    models = recipe.models
    stages: list[Stage] = [ShardSplitStage(config),
                           ShardAnswerStage(config, models[config.target])]
    if any(v.method == REFRAME and v.guidelines == "full" for v in config.variants.values()):
        stages.append(ShardRulesStage(config, models[config.rules_writer or config.target], recipe.seed))
    for variant in config.variants:
        reframer = models[config.reframer(variant)]
        if config.answer_stage(variant) != ANSWER:  # a teacher writes its own O1 first
            stages.append(ShardAnswerStage(config, reframer, config.answer_stage(variant)))
        rewriter = rewriting_endpoint(config, reframer)
        if config.method(variant) == REFRAME:
            stages += [ShardReframeStage(config, variant, rewriter), ShardRefineStage(config, variant, rewriter)]
        else:  # an inference-time baseline answers P1 directly
            stages.append(ShardPromptStage(config, variant, rewriter))
        stages += [ShardJudgeStage(config, variant, models[config.judge]), ShardSelectStage(config, variant)]
    return stages


def _check_thinking(shard: ShardConfig, refs: References, key: str, variants: list[str]) -> None:
    """SFT on thinking traces needs an O2 writer that thinks: refuse one whose endpoint turns thinking
    off (``chat_template_kwargs.enable_thinking: false``), naming it."""
    for v in variants:
        name = shard.reframer(v)
        endpoint = refs.recipe.models.get(name)
        if endpoint is not None and endpoint.chat_template_kwargs.get("enable_thinking") is False:
            raise ValueError(f"stages.sft.{key}.thinking_column: variant {v}'s O2 writer {name!r} runs with "
                             "chat_template_kwargs.enable_thinking: false, so it writes no thinking to train on; "
                             "use a teacher that thinks or drop thinking_column")


def check_shard(shard: ShardConfig, refs: References) -> dict[str, str | None]:
    """SHARD references: inputs that name enabled row stages, SFT on its rows under the system prompt it
    trains with (``train_system``; SHARD's differs from the one O1 and the evaluated answers use) and not
    on the split that shard_eval evaluates, a thinking O2 writer for SFT on thinking traces, and DPO
    (``stages.mdpo``) on its pairs only on a split that is not evaluated. Returns the endpoints it names."""
    refs.check_inputs("stages.shard.inputs", shard.inputs)
    models = {"stages.shard.target": shard.target, "stages.shard.judge": shard.judge,
              "stages.shard.rules_writer": shard.rules_writer}
    models.update({f"stages.shard.variants.{v}.reframer": c.reframer for v, c in shard.variants.items()})
    selected = {f"shard_select_{v}" for v in shard.variants}
    evaluation = refs.recipe.stages.shard_eval
    evaluated = evaluation.split if evaluation is not None else None
    trains_under, where = ((shard.train_system, "stages.shard.train_system") if shard.train_system is not None
                           else (shard.system, "stages.shard.system"))
    for key, sft in refs.recipe.stages.sft.items():
        if not selected & set(sft.inputs):
            continue
        if sft.system != trains_under:
            raise ValueError(f"stages.sft.{key}.system: {sft.system!r} differs from {where} {trains_under!r}; "
                             "set the one SHARD's rows are trained under in both")
        if evaluated is not None and sft.split in (None, evaluated):
            raise ValueError(f"stages.sft.{key}.split: {sft.split!r} trains on the split that "
                             f"stages.shard_eval evaluates ({evaluated!r}); use split: train")
        if sft.thinking_column:
            _check_thinking(shard, refs, key, [v for v in shard.variants if f"shard_select_{v}" in sft.inputs])
    dpo = refs.recipe.stages.mdpo
    if dpo is not None and selected & set(dpo.inputs) and evaluated is not None and dpo.split in (None, evaluated):
        raise ValueError(f"stages.mdpo.split: {dpo.split!r} trains on the split that stages.shard_eval evaluates "
                         f"({evaluated!r}); use split: train")
    return models


# SHARD data: after the seeds it reads, before sft_<key> trains on it
register("shard", config=ShardConfig, provides="rows", names=lambda c: c.row_stages(),
         build=shard_stages, check=check_shard, description="SHARD data construction: stages shard_*")
