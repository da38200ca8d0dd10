"""The generator–classifier loop (CHILLGuard §4.3), ``stages.loop``: iterations 0–2 as ordinary
stages, named by iteration, so that resume and ``chillguard status`` work unchanged.

::

    iteration 0  loop0_train_c0          C0 = guard SFT of the backbone on D_train(0)      (if evaluated)
                 loop0_eval_c0           C0 on the test split
    iteration 1  loop1_generate          G0: k candidates per training seed = D_gen(1)
                 loop1_<preprocess>      the recipe's preprocessing steps (normalise, dedup, ...)
                 loop1_decontaminate     candidates repeating a seed-stage row dropped (test first)
                 loop1_relabel[_adjudicate]  the recipe's jury (and adjudicator) label them     (relabel: jury)
                 loop1_train_c1          C1 = SFT of the backbone on D_train(0) ∪ D_gen(1)
                 loop1_eval_c1                                                              (if evaluated)
    iteration 2  loop2_calibrate         C1 on the seeds' train rows: ŷ's threshold  (labelling.calibrate)
                 loop2_label             C1 labels every candidate of D_gen(1): ŷ
                 loop2_score             G0 scores each candidate's quality s; levels L1–L4
                 loop2_pairs             pairs ⟨L1,L4⟩ ≻ ⟨L1,L3⟩ ≻ ⟨L2,L4⟩ within a seed = P(2)
                 loop2_mdpo              G1 = MDPO of G0 on P(2)
                 loop2_generate, loop2_<preprocess>, loop2_decontaminate[, loop2_relabel...]  D_gen(2), by G1
                 loop2_train_c2, loop2_eval_c2          C2 = SFT of the backbone on D_train(0) ∪ D_gen(2)
                 loop2_dpo, loop2_dpo_generate, ..., loop2_dpo_train_c2, loop2_eval_c2_dpo
                                         the ablation: G1 trained with plain DPO        (if evaluated)
                 loop_report             the ablation report (pipelines/loop/report.py)

Classifiers always start from the backbone (``classifier.model``); each training stage records the
digest of the weights it started from (``start_weights`` in its metrics). ``systems`` says which
classifiers are evaluated (and so which are built beyond the ones the loop needs): C0 (iteration 0
only), C1 (iteration 1 only), C2 (full, MDPO), C2 with DPO. All are evaluated on the same test rows
with the guard-evaluation harness (:mod:`pipelines.evaluation.guard_eval`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipelines.core.config import ADDED, CONFIGS, ExistingPath, Strict, as_written
from pipelines.core.registry import References, register
from pipelines.core.stage import Stage
from pipelines.data.preprocess import PreprocessSteps, build_steps, translation_endpoint
from pipelines.evaluation.guard_eval import GuardEvalConfig, GuardEvalStage
from pipelines.loop.decontaminate import DecontaminateStage
from pipelines.loop.generate import GenerateStage, RewritePrompt
from pipelines.loop.levels import QUALITY_THRESHOLD
from pipelines.loop.pairs import PairsStage
from pipelines.loop.relabel import relabel_stages
from pipelines.loop.report import LoopReportStage, eval_stage
from pipelines.loop.score import ScoreStage
from pipelines.training.mdpo import MDPOConfig, MDPOSettings, MDPOStage, PairColumns
from pipelines.training.sft import GuardSFTConfig, GuardSFTStage

PROMPTS = CONFIGS / "prompts"
#: the classifiers a loop can evaluate: C0 (iteration 0 only), C1 (iteration 1 only), C2 (full, MDPO),
#: C2 with G1 trained by plain DPO (the seed's Table 3 ablations)
SYSTEMS = ("c0", "c1", "c2", "c2_dpo")
_ITERATION = {"c0": 0, "c1": 1, "c2": 2, "c2_dpo": 2}


class RewriteTemplates(Strict):
    """The generator's templates, chosen by the seed's label (Appendix D.1.1 / D.1.2)."""

    unsafe: ExistingPath = Field(str(PROMPTS / "loop_rewrite_unsafe.yaml"), validate_default=True)
    safe: ExistingPath = Field(str(PROMPTS / "loop_rewrite_safe.yaml"), validate_default=True)


class LabellingConfig(Strict):
    """How C1 labels the candidates in iteration 2 (the guard-evaluation settings of ``loop2_label``)."""

    score: bool = Field(True, description="decide by P(unsafe) >= threshold from the first answer token; "
                        "false: by the answer's first line")
    threshold: float = Field(0.5, ge=0, le=1)
    calibrate: bool = Field(
        False, description="choose the threshold instead: the best F1 of C1's P(unsafe) on the seeds' train "
        "rows (stage loop2_calibrate), for a classifier whose scores rank but sit on one side of 0.5 "
        "(few seeds); the paper uses C1's plain prediction")
    greedy: bool = Field(True, description="the paper: C1's most likely answer. false: sample at the "
                         "classifier endpoint's temperature (with score: false, ŷ is drawn from C1's "
                         "distribution; a near-constant classifier then still disagrees within a seed)")

    @model_validator(mode="after")
    def _check(self) -> LabellingConfig:
        if self.calibrate and not self.score:
            raise ValueError("labelling.calibrate chooses a threshold for P(unsafe): it needs score: true")
        return self


class LoopConfig(Strict):
    """The generator–classifier loop (CHILLGuard §4.3; stage names in ``pipelines/loop/loop.py``)."""

    seeds: list[str] = Field(default_factory=lambda: ["assemble"], min_length=1,
                             description="labelled row stages with a split column: their train rows are "
                             "D_train(0) and the seeds; the other rows are held out (decontamination, evaluation)")
    train_split: str = "train"
    test_split: str = "test"
    iterations: Literal[0, 1, 2] = 2
    k: int = Field(4, ge=1, description="candidates per seed (one request with n = k where the engine allows)")
    generator: str | None = Field(None, description="endpoint under `models:` running G0 (sampling: the paper's "
                                  "temperature 0.7, max_tokens 2048)")
    trained_generator: str | None = Field(
        None, description="engine vllm endpoint whose settings run G1 (the folder loop2_mdpo exports); "
        "default: generator")
    scorer: str | None = Field(None, description="endpoint scoring quality s in [1, 5]; default: generator (G0)")
    templates: RewriteTemplates = Field(default_factory=RewriteTemplates)
    score_template: ExistingPath = Field(str(PROMPTS / "loop_quality.yaml"), validate_default=True)
    quality_threshold: int = Field(QUALITY_THRESHOLD, ge=1, le=5, description="s >= it is a good rewrite (L1, L4)")
    max_pairs_per_seed: int | None = Field(
        1, ge=1, description="pairs one seed may give (a candidate is in at most one pair, so at most k // 2); "
        "null = as many as its candidates allow")
    preprocess: PreprocessSteps | None = Field(
        None, description="preprocessing of the candidates; default: the steps of stages.preprocess "
        "(normalise, length filter, dedup, near dedup...) when it is enabled, else their defaults")
    classifier: GuardSFTConfig = Field(description="guard SFT settings; `model` is the backbone every "
                                       "classifier starts from (the loop sets the inputs)")
    classifier_endpoint: str = Field(description="engine vllm endpoint whose settings run the trained "
                                     "classifiers (labelling in iteration 2, evaluation)")
    constrained: bool = Field(False, description="hold classifier answers to the guard format (tiny or "
                              "barely trained classifiers)")
    labelling: LabellingConfig = Field(default_factory=LabellingConfig)
    generator_training: MDPOSettings | None = Field(
        None, description="MDPO of G0 on P(2) (`model`: G0's weights); required with iterations: 2")
    relabel: Literal["off", "jury"] = Field(
        "off", description="jury: the recipe's jury (stages.jury, and stages.adjudicate when present) labels "
        "each iteration's candidates after decontamination, and its label is y* for the levels and pairs "
        "(a candidate it cannot label is ineligible); a judge call per judge and candidate (fewer with its "
        "cascade). off: a candidate keeps its seed's label (the paper)", json_schema_extra=ADDED)
    systems: list[Literal[SYSTEMS]] = Field(
        default_factory=lambda: ["c0", "c2"], description="classifiers evaluated on the test split and "
        "compared in the report: c0, c1, c2 (MDPO), c2_dpo (G1 trained with DPO)")

    @field_validator("relabel", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads an unquoted `off` as false

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> LoopConfig:
        if "inputs" in self.classifier.model_fields_set and as_written(info):
            raise ValueError("classifier.inputs: the loop sets each classifier's inputs (seeds + its D_gen)")
        late = [s for s in self.systems if _ITERATION[s] > self.iterations]
        if late:
            raise ValueError(f"systems {late} need more than iterations: {self.iterations}")
        if self.iterations >= 1 and self.generator is None:
            raise ValueError("iterations >= 1 needs generator: the endpoint running G0")
        if self.iterations == 2 and self.generator_training is None:
            raise ValueError("iterations: 2 needs generator_training (MDPO of G0 -> G1)")
        if len(set(self.systems)) != len(self.systems):
            raise ValueError(f"systems has repeats: {self.systems}")
        return self


def variants(config: LoopConfig) -> list[str]:
    """How G1 is trained in iteration 2: ``mdpo`` (for C2) and/or ``dpo`` (for C2 with DPO)."""
    return [v for v, system in (("mdpo", "c2"), ("dpo", "c2_dpo")) if system in config.systems]


def _preprocess(recipe: Any, config: LoopConfig) -> PreprocessSteps:
    if config.preprocess is not None:
        return config.preprocess
    main = recipe.stages.preprocess
    if main is not None:
        return PreprocessSteps.model_validate(main.model_dump(exclude={"inputs"}))
    return PreprocessSteps()


def build_loop(recipe: Any, config: LoopConfig) -> list[Stage]:
    taxonomy = recipe.taxonomy
    seeds = tuple(config.seeds)
    steps = _preprocess(recipe, config)
    prompt = RewritePrompt(config.templates.unsafe, config.templates.safe, taxonomy) if config.iterations else None
    stages: list[Stage] = []
    drifted: list[Stage] = []  # the stage giving the jury's label of each generation (relabel: jury)

    def classifier(iteration: int, system: str, generated: str | None) -> None:
        train = f"loop{iteration}_train_{system}"
        sft = config.classifier.model_copy(update={"inputs": [*seeds, *([generated] if generated else [])],
                                                   "split": config.train_split})
        stages.append(GuardSFTStage(sft, taxonomy, name=train))
        if system in config.systems:
            stages.append(evaluation(eval_stage(system), train, list(seeds), config.test_split))

    def evaluation(name: str, model_from: str, inputs: list[str], split: str | None,
                   labelling: LabellingConfig | None = None, threshold_from: str | None = None) -> GuardEvalStage:
        how = labelling.model_dump(exclude={"calibrate"}) if labelling is not None else {}
        if threshold_from is not None:
            how["threshold_from"] = threshold_from
        eval_config = GuardEvalConfig(inputs=inputs, split=split, model=config.classifier_endpoint,
                                      model_from=model_from, template=config.classifier.template,
                                      level=config.classifier.level, constrained=config.constrained, **how)
        return GuardEvalStage(name, eval_config, recipe.models[config.classifier_endpoint], taxonomy, name=name)

    def generation(prefix: str, iteration: int, generator: str, endpoint: str,
                   model_from: str | None) -> tuple[str, str | None]:
        """The generation's stages; returns the candidates (D_gen) and the stage giving their jury label."""
        generate = GenerateStage(f"{prefix}_generate", inputs=seeds, endpoint=recipe.models[endpoint],
                                 prompt=prompt, k=config.k, iteration=iteration, generator=generator,
                                 seed_split=config.train_split, model_from=model_from)
        cleaned = build_steps(steps, (generate.name,), recipe.models, prefix=f"{prefix}_")
        decontaminate = DecontaminateStage(f"{prefix}_decontaminate", inputs=((cleaned or [generate])[-1].name,),
                                           reference=seeds, test_split=config.test_split, near=steps.near_dedup)
        relabel = relabel_stages(recipe, prefix, decontaminate.name) if config.relabel == "jury" else []
        stages.extend([generate, *cleaned, decontaminate, *relabel])
        drifted.extend(relabel[-1:])
        return decontaminate.name, (relabel[-1].name if relabel else None)

    if "c0" in config.systems:
        classifier(0, "c0", None)
    if config.iterations >= 1:
        generated, relabelled = generation("loop1", 1, "G0", config.generator, None)
        classifier(1, "c1", generated)
    if config.iterations == 2:
        calibration = None
        if config.labelling.calibrate:
            calibration = "loop2_calibrate"
            stages.append(evaluation(calibration, "loop1_train_c1", list(seeds), config.train_split,
                                     config.labelling.model_copy(update={"calibrate": False})))
        stages.append(evaluation("loop2_label", "loop1_train_c1", [generated], None, config.labelling, calibration))
        stages.append(ScoreStage("loop2_score", inputs=("loop2_label",),
                                 endpoint=recipe.models[config.scorer or config.generator],
                                 template=config.score_template, threshold=config.quality_threshold))
        stages.append(PairsStage("loop2_pairs", inputs=seeds, scored="loop2_score", labelled="loop2_label",
                                 prompt=prompt, seed=recipe.seed, max_pairs=config.max_pairs_per_seed,
                                 seed_split=config.train_split, iteration=2, relabelled=relabelled,
                                 threshold=config.quality_threshold))
        for variant in variants(config):
            training = MDPOConfig.model_validate({
                **config.generator_training.model_dump(), "dynamic_beta": variant == "mdpo",
                "inputs": ["loop2_pairs"], "columns": PairColumns(id="id", system="system").model_dump()})
            trained = f"loop2_{variant}"
            stages.append(MDPOStage(training, name=trained))
            prefix = "loop2" if variant == "mdpo" else "loop2_dpo"
            generated2, _ = generation(prefix, 2, "G1" if variant == "mdpo" else "G1_dpo",
                                       config.trained_generator or config.generator, trained)
            classifier(2, "c2" if variant == "mdpo" else "c2_dpo", generated2)
    stages.append(LoopReportStage([s.name for s in stages], systems=config.systems, taxonomy_path=taxonomy,
                                  drift_stages=[s.name for s in drifted]))
    return stages


def loop_stage_names(config: LoopConfig) -> list[str]:
    """The training stages a loop provides (what ``model_from`` may name elsewhere)."""
    names = ["loop0_train_c0"] if "c0" in config.systems else []
    if config.iterations >= 1:
        names.append("loop1_train_c1")
    if config.iterations == 2:
        for variant in variants(config):
            names += [f"loop2_{variant}", "loop2_train_c2" if variant == "mdpo" else "loop2_train_c2_dpo"]
    return names


def _check(config: LoopConfig, refs: References) -> dict[str, str | None]:
    refs.check_inputs("stages.loop.seeds", config.seeds)
    if config.relabel == "jury" and refs.recipe.stages.jury is None:
        raise ValueError("stages.loop.relabel: jury relabels the candidates with the recipe's jury, but the recipe "
                         "has no stages.jury section (add one with its judges, or set relabel: off)")
    models = {"stages.loop.classifier_endpoint": config.classifier_endpoint, "stages.loop.generator": config.generator,
              "stages.loop.scorer": config.scorer, "stages.loop.trained_generator": config.trained_generator}
    for key in ("classifier_endpoint", "trained_generator"):
        name = getattr(config, key) or (config.generator if key == "trained_generator" and config.iterations == 2
                                        else None)
        endpoint = refs.recipe.models.get(name) if name else None
        if endpoint is not None and endpoint.engine != "vllm":
            what = "the classifiers" if key == "classifier_endpoint" else "G1"
            raise ValueError(f"stages.loop.{key}: {what} are folders of this run that only engine vllm loads; "
                             f"endpoint {name!r} is engine {endpoint.engine}"
                             + ("" if key == "classifier_endpoint"
                                else " (set trained_generator: <an engine: vllm endpoint>)"))
    if config.preprocess is not None:
        models.update(translation_endpoint(config.preprocess, "stages.loop.preprocess"))
    return {k: v for k, v in models.items() if v is not None}


register("loop", config=LoopConfig, provides="model", names=loop_stage_names, check=_check,
         evaluations=lambda config: [eval_stage(system) for system in config.systems],
         build=build_loop, description="the generator–classifier loop (CHILLGuard §4.3), iterations 0-2")
