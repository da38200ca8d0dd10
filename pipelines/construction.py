"""The CHILLGuard data-construction driver: the recipe's stages, in order, with resume."""

from __future__ import annotations

import logging

from pipelines.core.config import PreprocessConfig, Recipe, dump_recipe
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage, run_stages
from pipelines.data.embedding import EmbedStage
from pipelines.data.ingest import IngestStage
from pipelines.data.keywords import KeywordPoolStage
from pipelines.data.pe_rewrite import PERewriteStage
from pipelines.data.preprocess import (
    DedupStage, LangIdStage, LengthFilterStage, NearDedupStage, NormalizeStage, TranslateStage,
)
from pipelines.data.retrieval import RetrieveStage
from pipelines.data.rewrite import RagRewriteStage, RewriteStage
from pipelines.data.vector_index import IndexStage
from pipelines.evaluation.guard_eval import GuardEvalStage
from pipelines.labelling.assembly import AssembleStage
from pipelines.labelling.jury import AdjudicateStage, JuryStage
from pipelines.shard.shard import shard_stages
from pipelines.shard.shard_eval import ShardEvalStage
from pipelines.training.mdpo import MDPOStage
from pipelines.training.sft import ChatSFTStage, GuardSFTStage

log = logging.getLogger(__name__)

PREPROCESS_STAGES = {"normalize": NormalizeStage, "langid": LangIdStage, "translate": TranslateStage,
                     "length_filter": LengthFilterStage, "dedup": DedupStage,
                     "near_dedup": NearDedupStage}


def build_stages(recipe: Recipe) -> list[Stage]:
    """The stages the recipe enables, in pipeline order."""
    s = recipe.stages
    stages: list[Stage] = []
    if s.keywords is not None:
        endpoint = recipe.models[s.keywords.model] if s.keywords.model else None
        stages.append(KeywordPoolStage(s.keywords, endpoint, recipe.taxonomy))
    if s.ingest is not None:
        stages.append(IngestStage(s.ingest))
    for key, seeds in s.seeds.items():
        stages.append(IngestStage(seeds, name=f"seeds_{key}"))
    if s.embed is not None:
        stages.append(EmbedStage(s.embed))
    if s.index is not None:
        stages.append(IndexStage(s.index, recipe.seed))
    if s.retrieve is not None:
        stages.append(RetrieveStage(s.retrieve, s.embed, recipe.taxonomy, recipe.seed, recipe.run_dir))
    if s.rag is not None:
        stages.append(RagRewriteStage(s.rag, recipe.models[s.rag.model]))
    if s.rewrite is not None:
        stages.append(RewriteStage(s.rewrite, recipe.models[s.rewrite.model]))
    if s.pe is not None:
        stages.append(PERewriteStage(s.pe, recipe.models[s.pe.model], recipe.taxonomy, recipe.seed))
    if s.preprocess is not None:
        upstream = tuple(s.preprocess.inputs)
        for step in PreprocessConfig.STEPS:
            config = getattr(s.preprocess, step)
            if config is not None:
                stages.append(PREPROCESS_STAGES[step](config, upstream))
                upstream = (stages[-1].name,)
    if s.jury is not None:
        stages.append(JuryStage(s.jury, recipe.models, recipe.taxonomy))
    if s.adjudicate is not None:
        stages.append(AdjudicateStage(s.adjudicate, recipe.models[s.adjudicate.model], recipe.taxonomy,
                                      min_valid_votes=s.jury.quorum))  # config: adjudicate needs jury
    if s.assemble is not None:
        labelling = {"judges": [f"{j} ({recipe.models[j].model})" for j in (s.jury.judges if s.jury else [])],
                     "adjudicator": (f"{s.adjudicate.model} ({recipe.models[s.adjudicate.model].model})"
                                     if s.adjudicate else None),
                     "min_valid_votes": s.jury.quorum if s.jury else None}
        stages.append(AssembleStage(s.assemble, recipe.taxonomy, recipe.seed, labelling))
    stages += shard_stages(recipe)  # SHARD data: after the seeds it reads, before sft_<key> trains on it
    if s.guard_sft is not None:
        stages.append(GuardSFTStage(s.guard_sft, recipe.taxonomy))
    for key, sft in s.sft.items():
        stages.append(ChatSFTStage(key, sft))
    if s.mdpo is not None:
        stages.append(MDPOStage(s.mdpo))
    for key, ev in s.guard_eval.items():
        stages.append(GuardEvalStage(key, ev, recipe.models[ev.model], recipe.taxonomy))
    if s.shard_eval is not None:  # after the sft_<key> stages whose models it evaluates
        stages.append(ShardEvalStage(s.shard_eval, s.shard, recipe.models))
    return stages


def run_recipe(recipe: Recipe, stages: list[Stage], *, force: bool = False) -> dict[str, dict]:
    """Run ``stages`` (from :func:`build_stages`) into the recipe's run directory; return manifests.

    Stages are built by the caller before it connects to Ray, so template and reference problems
    fail before any cluster work. The run directory is locked for the whole run
    (:meth:`RunDir.lock`; raises :class:`pipelines.core.rundir.RunDirLocked` when another run holds it).
    """
    rundir = RunDir(recipe.run_dir)
    with rundir.lock():
        rundir.write_text("recipe.yaml", dump_recipe(recipe))
        log.info("run directory: %s", recipe.run_dir)
        return run_stages(stages, rundir, force=force)
