"""The served guard without Ray: reading answers, the two answer shapes, input checks, settings,
the Serve YAMLs, and which guard of a run is served."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import yaml

from pipelines.core.config import CONFIGS, ConfigError
from pipelines.core.taxonomy import load_taxonomy
from pipelines.serve.categories import UNSPECIFIED, category_scores, moderation_result
from pipelines.serve.moderation import Completion, GuardAnswerError, code_shares, guard_result, read_verdict

TAXONOMY = load_taxonomy(CONFIGS / "taxonomy.yaml")
CODES = frozenset(TAXONOMY.micro_codes)
TOKENS = {"safe": ["SAFE", "Safe", "safe"], "unsafe": ["UNSAFE", "Unsafe", "unsafe"]}


def p_unsafe(lp_unsafe: float, lp_safe: float) -> float:
    return math.exp(lp_unsafe) / (math.exp(lp_unsafe) + math.exp(lp_safe))


def test_single_token_codes_form_a_distribution():
    answer = Completion(text="unsafe\nB5", tokens=["unsafe", "\n", "B5"], token_logprobs=[-0.1, -0.01, -0.3],
                        top_logprobs=[{"unsafe": -0.1, "safe": -2.4, "s": -3.0}, {"\n": -0.01},
                                      {"B5": -0.3, "B4": -1.5, "A1": -3.0, "zz": -4.0}])
    verdict = read_verdict(answer, TOKENS, CODES, threshold=0.5)
    score = p_unsafe(-0.1, -2.4)
    assert verdict.label == "unsafe" and verdict.micro == "B5" and verdict.scored
    assert verdict.score == pytest.approx(score)
    assert verdict.shares == pytest.approx({"B5": math.exp(-0.3), "B4": math.exp(-1.5), "A1": math.exp(-3.0)})
    scores = category_scores(verdict, TAXONOMY)
    assert scores["B5"] == pytest.approx(score * math.exp(-0.3), abs=1e-6)
    assert scores["B"] == pytest.approx(score * (math.exp(-0.3) + math.exp(-1.5)), abs=1e-6)
    assert scores["A"] == pytest.approx(score * math.exp(-3.0), abs=1e-6)
    assert scores["C1"] == 0.0 and len(scores) == 31 + 5 + 1
    # unspecified: the part of P(unsafe) no code accounts for, none here (these shares sum to just over 1)
    assert math.exp(-0.3) + math.exp(-1.5) + math.exp(-3.0) > 1 and scores[UNSPECIFIED] == 0.0
    result = moderation_result(verdict, TAXONOMY)
    assert result["flagged"] is True
    assert {code for code, on in result["categories"].items() if on} == {"B5", "B"}
    assert set(result["category_applied_input_types"]) == set(scores)
    assert all(kinds == ["text"] for kinds in result["category_applied_input_types"].values())


def test_multi_token_code_gets_the_product_of_its_tokens():
    answer = Completion(text="\nunsafe\nB5", tokens=["\n", "unsafe", "\n", "B", "5"],
                        token_logprobs=[-0.01, -0.2, -0.01, -0.2, -0.1],
                        top_logprobs=[{"\n": -0.01}, {"unsafe": -0.2, "safe": -1.7}, {"\n": -0.01},
                                      {"B": -0.2, "A": -1.8}, {"5": -0.1, "4": -2.4}])
    verdict = read_verdict(answer, TOKENS, CODES, threshold=0.5)
    assert verdict.score == pytest.approx(p_unsafe(-0.2, -1.7))  # the first token that is not blank
    assert verdict.shares == pytest.approx({"B5": math.exp(-0.3)})  # alternatives of a split code: unknown


def test_safe_answer_and_a_low_threshold():
    answer = Completion(text="safe", tokens=["safe"], token_logprobs=[-0.05],
                        top_logprobs=[{"safe": -0.05, "unsafe": -3.0}])
    verdict = read_verdict(answer, TOKENS, CODES, threshold=0.5)
    assert verdict.label == "safe" and verdict.micro is None and not verdict.flagged
    assert verdict.score == pytest.approx(p_unsafe(-3.0, -0.05))
    scores = category_scores(verdict, TAXONOMY)
    assert set(scores.values()) - {scores[UNSPECIFIED]} == {0.0}
    assert scores[UNSPECIFIED] == pytest.approx(verdict.score, abs=1e-6)  # no code accounts for any of it
    assert not any(moderation_result(verdict, TAXONOMY)["categories"].values())
    low = read_verdict(answer, TOKENS, CODES, threshold=0.01)  # the threshold overrules the answer
    assert low.flagged and low.micro is None
    # flagged without a code: it names `unspecified` (issue 32: it used to name no category at all)
    categories = moderation_result(low, TAXONOMY)["categories"]
    assert {code for code, on in categories.items() if on} == {UNSPECIFIED}


def test_a_threshold_above_the_answer_drops_its_code():
    answer = Completion(text="unsafe\nA1", tokens=["unsafe", "\n", "A1"], token_logprobs=[-0.6, 0.0, 0.0],
                        top_logprobs=[{"unsafe": -0.6, "safe": -0.8}, {"\n": 0.0}, {"A1": 0.0}])
    verdict = read_verdict(answer, TOKENS, CODES, threshold=0.9)
    assert verdict.label == "safe" and verdict.micro is None
    assert category_scores(verdict, TAXONOMY)["A1"] == pytest.approx(p_unsafe(-0.6, -0.8), abs=1e-6)


def test_every_spelling_counts_and_the_score_agrees_with_the_answer():
    """Issue 28: "Safe" at p = 0.97 with lowercase "unsafe" at p = 0.001 the only token the score read
    was served as unsafe with score 1.0."""
    answer = Completion(text="Safe", tokens=["Safe"], token_logprobs=[math.log(0.97)],
                        top_logprobs=[{"Safe": math.log(0.97), "unsafe": math.log(0.001), "I": math.log(0.01)}])
    verdict = read_verdict(answer, TOKENS, CODES, threshold=0.5)
    assert (verdict.label, verdict.scored) == ("safe", True) and verdict.score == pytest.approx(0.001 / 0.971)
    assert read_verdict(answer, TOKENS, CODES, threshold=0.001).flagged   # unless the threshold says so
    # "Unsafe" and " unsafe" both count for unsafe
    mixed = Completion(text="Unsafe\nB5", tokens=["Unsafe", "\n", "B5"], token_logprobs=[-0.4, 0.0, 0.0],
                       top_logprobs=[{"Unsafe": -0.4, " unsafe": -2.0, "safe": -1.5}, {"\n": 0.0}, {"B5": 0.0}])
    verdict = read_verdict(mixed, TOKENS, CODES, threshold=0.5)
    assert verdict.score == pytest.approx(p_unsafe(math.log(math.exp(-0.4) + math.exp(-2.0)), -1.5))
    assert verdict.flagged and verdict.micro == "B5"


def test_answers_without_a_verdict():
    junk = Completion(text="hello", tokens=["hello"], token_logprobs=[-0.1], top_logprobs=[{"hello": -0.1}])
    with pytest.raises(GuardAnswerError, match="no verdict and no score"):
        read_verdict(junk, TOKENS, CODES, threshold=0.5)
    # a score without a readable line still decides; no code
    scored = Completion(text="maybe", tokens=["maybe"], token_logprobs=[-0.5],
                        top_logprobs=[{"maybe": -0.5, "unsafe": -1.0, "safe": -2.0}])
    verdict = read_verdict(scored, TOKENS, CODES, threshold=0.5)
    assert verdict.flagged and verdict.micro is None and verdict.score == pytest.approx(p_unsafe(-1.0, -2.0))
    # no log-probabilities at all (an engine that returns none): the text decides, 1.0 / 0.0
    plain = Completion(text="unsafe\nE2")
    verdict = read_verdict(plain, TOKENS, CODES, threshold=0.5)
    assert (verdict.label, verdict.score, verdict.scored, verdict.micro) == ("unsafe", 1.0, False, "E2")
    assert code_shares(plain, "E2", CODES) == {}


def test_guard_result_names_the_category_in_both_languages():
    answer = Completion(text="unsafe\nB5", tokens=["unsafe", "\n", "B5"], token_logprobs=[-0.1, 0.0, -0.2],
                        top_logprobs=[{"unsafe": -0.1, "safe": -2.4}, {"\n": 0.0}, {"B5": -0.2}])
    verdict = read_verdict(answer, TOKENS, CODES, threshold=0.5)
    result = guard_result(verdict, TAXONOMY, level="response", threshold=0.5, model="g", latency_ms=3.21,
                          prompt_tokens=17)
    micro, macro = TAXONOMY.micro("B5"), TAXONOMY.macro("B")
    assert result["category"] == {"micro": "B5", "micro_zh": micro.zh, "micro_en": micro.en, "macro": "B",
                                  "macro_zh": macro.zh, "macro_en": macro.en, "share": round(math.exp(-0.2), 6)}
    assert (result["label"], result["level"], result["prompt_tokens"], result["threshold"]) == \
        ("unsafe", "response", 17, 0.5)


@pytest.mark.parametrize("value,allow_list,status,message", [
    ("", True, 400, "`input` is empty"),
    ("   ", True, 400, "`input` is empty"),
    (5, True, 400, "must be a string or a list of strings, got int"),
    ([], True, 400, "empty list"),
    (["ok", 3], True, 400, r"`input\[1\]` must be a string, got int"),
    (["ok", ""], True, 400, r"`input\[1\]` is empty"),
    (["a"] * 5, True, 413, "has 5 texts; at most 4"),
    (["a"], False, 400, "must be a string, got list"),
])
def test_bad_inputs(value, allow_list, status, message):
    from pipelines.serve.ingress import ApiError, _texts

    with pytest.raises(ApiError, match=message) as err:
        _texts(value, "input", allow_list=allow_list, max_inputs=4)
    assert err.value.status == status
    assert _texts(["a", "b"], "input", allow_list=True, max_inputs=4) == ["a", "b"]


def test_a_bad_policy_is_a_400_naming_its_entry():
    from types import SimpleNamespace

    from pipelines.serve.ingress import ApiError, GuardIngress

    ingress = SimpleNamespace(taxonomy=TAXONOMY)
    policy = GuardIngress.func_or_class._policy
    assert policy(ingress, {"prompt": "x"}) is None and policy(ingress, {"policy": None}) is None
    assert policy(ingress, {"policy": ["E", "A1"]}) == ("A1", "E1", "E2")
    for given, param, message in ((["A", "Z9"], "policy[1]", "unknown code 'Z9'"), ([], "policy", "empty list")):
        with pytest.raises(ApiError, match=message) as err:
            policy(ingress, {"policy": given})
        assert (err.value.status, err.value.kind, err.value.param) == (400, "invalid_request_error", param)


def test_serve_yamls_are_valid_serve_configs_and_guard_settings(tiny_models):
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve.config import GuardServeConfig

    for name in ("guard.yaml", "cpu.yaml"):
        data = yaml.safe_load((CONFIGS / "serve" / name).read_text())
        ServeDeploySchema.model_validate(data)  # Ray Serve's own schema
        app = data["applications"][0]
        assert app["import_path"] == "pipelines.serve.app:build_app"
        # cpu.yaml names the tiny model `make demo` builds into models/tiny: here, the test's copy
        local = app["args"]["model"].startswith("models/")
        GuardServeConfig.model_validate({**app["args"], **({"model": tiny_models["causal-lm"]} if local else {})})


def serve_args(**given):
    return argparse.Namespace(**{"run_dir": None, "overrides": [], "model": None, "stage": None, "config": None,
                                 "host": None, "port": None, **given})


def test_serve_settings_precedence_and_errors(tiny_models):
    from pipelines.serve.cli import serve_settings

    model = tiny_models["causal-lm"]
    config, http, _ = serve_settings(serve_args(model=model), cuda=False)  # no CUDA: the CPU settings
    assert config.engine.cpu and http == {"host": "127.0.0.1", "port": 8000}
    assert not serve_settings(serve_args(model=model), cuda=True)[0].engine.cpu
    config, http, what = serve_settings(serve_args(run_dir="threshold=0.3", overrides=["max_batch_size=1"],
                                                   model=model, port=9001), cuda=False)
    assert (config.threshold, config.max_batch_size, config.model, http["port"], what) == (0.3, 1, model, 9001, model)
    with pytest.raises(ConfigError, match="unknown key"):
        serve_settings(serve_args(model=model, overrides=["engine.gpus=2"]), cuda=False)
    with pytest.raises(ConfigError, match="min_replicas 3 > max_replicas 1"):
        serve_settings(serve_args(model=model, overrides=["ingress.autoscaling_config.min_replicas=3"]), cuda=False)
    with pytest.raises(ConfigError, match="model path does not exist: /nowhere"):
        serve_settings(serve_args(model="/nowhere"), cuda=False)
    with pytest.raises(ConfigError, match="not both"):
        serve_settings(serve_args(run_dir="runs/x", model=model), cuda=False)
    with pytest.raises(ConfigError, match="does not exist"):
        serve_settings(serve_args(config="nowhere.yaml"), cuda=False)


def test_the_serve_command_lists_every_route_of_the_ingress(tiny_models):
    """What ``chillguard serve`` prints is the ingress's routes, no more and no fewer, and names the upstream."""
    from fastapi.routing import APIRoute

    from pipelines.serve.cli import route_lines, serve_settings
    from pipelines.serve.ingress import api

    config, _, _ = serve_settings(serve_args(model=tiny_models["causal-lm"]), cuda=False)
    printed = {tuple(line.split()[:2]) for line in route_lines(config)}
    served = {(method, route.path) for route in api.routes if isinstance(route, APIRoute) for method in route.methods}
    assert printed == served
    assert "404 until proxy.upstream_base_url" in "\n".join(route_lines(config))
    config, _, _ = serve_settings(serve_args(model=tiny_models["causal-lm"],
                                             overrides=["proxy.upstream_base_url=http://llm:8000/v1"]), cuda=False)
    assert "upstream http://llm:8000/v1" in "\n".join(route_lines(config))


def test_waiting_for_readiness_reads_each_state_until_200():
    """The serve command's wait (and the serving benchmark's) against a real HTTP server: 503 warming_up,
    then 200; it reports each change of state once, and gives up past its timeout naming the last state."""
    import http.server
    import threading
    import time

    from pipelines.serve.cli import wait_until_ready

    answers = [(503, b'{"status": "warming_up"}')] * 3 + [(200, b'{"status": "ready"}')]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # http.server's name for the GET handler
            status, body = answers.pop(0) if len(answers) > 1 else answers[0]
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        lines = []
        waited = wait_until_ready(url, time.monotonic(), every_s=0.05, report=lines.append)
        assert lines[0] == "waiting for readiness (warming_up) ..." and lines[-1].startswith("ready after")
        assert len(lines) == 2 and waited >= 0.1
        stopped = threading.Event()
        stopped.set()  # asked to stop (Ctrl-C) while still warming up: no wait, no answer
        assert wait_until_ready(url, time.monotonic(), every_s=0.05, stop=stopped) is None
        answers[:] = [(503, b'{"status": "failed"}')]
        with pytest.raises(TimeoutError, match="not ready within 0.2 s \\(last: failed\\)"):
            wait_until_ready(url, time.monotonic(), every_s=0.05, timeout_s=0.2)
    finally:
        server.shutdown()


def test_engine_placement():
    from pipelines.serve.app import llm_config
    from pipelines.serve.config import GuardServeConfig

    cpu = llm_config(GuardServeConfig(model="Qwen/Qwen3-8B", engine={"cpu": True, "cpus": 2}))
    assert cpu.placement_group_config == {"bundles": [{"CPU": 2}]}
    assert cpu.deployment_config["ray_actor_options"] == {"num_cpus": 0}
    gpu = llm_config(GuardServeConfig(model="Qwen/Qwen3-8B", engine={"accelerator_type": "H100"}))
    assert gpu.accelerator_type == "H100" and gpu.placement_group_config is None
    assert gpu.deployment_config["autoscaling_config"]["target_ongoing_requests"] == 32


def test_the_guard_a_run_trained(tmp_path, tiny_models):
    """The last finished guard-training stage with a model folder; its prompt, engine arguments and
    threshold from what the run's manifests export (the stages' own declarations)."""
    from pipelines.construction import build_stages, load_recipe
    from pipelines.core.rundir import RunDir
    from pipelines.serve.app import run_guard
    from tests.loop.test_loop_units import LOOP

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"text": "x", "label": "safe"}\n')
    run = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(LOOP.format(run=run, model=tiny_models["causal-lm"], seeds=seeds))
    recipe = load_recipe(path, ["stages.loop.systems=[c0,c2,c2_dpo]", "stages.loop.labelling.threshold=0.4",
                                "stages.loop.constrained=true", "stages.compare.main.systems.C2.test=loop2_eval_c2",
                                "stages.guard_eval.val.inputs=[seeds_real]",
                                "stages.guard_eval.val.model_from=loop2_train_c2",
                                "stages.guard_eval.val.model=gen", "stages.guard_eval.val.constrained=false"])
    stages = {s.name: s for s in build_stages(recipe)}
    rundir = RunDir(str(run))
    rundir.write_text("recipe.yaml", "name: r\n")
    with pytest.raises(ConfigError, match="no finished guard-training stage"):
        run_guard(str(run))
    clock = iter(range(10, 60))

    def finished(stage: str, status: str = "complete") -> None:
        rundir.write_manifest(stage, {"stage": stage, "status": status, "exports": stages[stage].exports(rundir),
                                      "finished_at": f"2026-12-06T10:00:{next(clock)}"})

    def trained(stage: str) -> None:
        finished(stage)
        shutil.copytree(tiny_models["causal-lm"], run / stage / "model")

    for evaluation in ("loop0_eval_c0", "loop2_eval_c2", "guard_eval_val"):
        finished(evaluation)
    trained("loop0_train_c0")
    trained("loop2_train_c2_dpo")
    assert run_guard(str(run))[0] == "loop0_train_c0"  # the DPO ablation only when nothing else is there
    trained("loop1_train_c1")
    trained("loop2_train_c2")
    stage, settings, notes = run_guard(str(run))
    assert stage == "loop2_train_c2"
    # the threshold is served under the decoding it was chosen under (issue 28: evaluated and
    # calibrated constrained, served unconstrained), and the start line says so
    assert settings["constrained"] is True and notes == ["threshold 0.5 from loop2_eval_c2",
                                                         "constrained: true as loop2_eval_c2 evaluated"]
    assert settings["model"] == str((run / "loop2_train_c2" / "model").resolve())
    endpoint = recipe.models[recipe.stages.loop.classifier_endpoint]
    assert settings["engine"] == {"engine_kwargs": endpoint.engine_kwargs}  # as loop2_eval_c2 ran it
    assert settings["threshold"] == 0.5 and settings["template"] == recipe.stages.loop.classifier.template
    assert settings["taxonomy"] == recipe.taxonomy
    assert run_guard(str(run), "loop2_train_c2_dpo")[0] == "loop2_train_c2_dpo"
    # a comparison stage's calibrated threshold for this model wins (only once that stage finished)
    rundir.write_text("compare_main/report/thresholds.json", json.dumps(
        {"C2": {"threshold": 0.37, "model_from": "loop2_train_c2", "stage": "guard_eval_val"},
         "C0": {"threshold": 0.2, "model_from": "loop0_train_c0", "stage": "loop0_eval_c0"}}))
    assert run_guard(str(run))[1]["threshold"] == 0.5
    finished("compare_main")
    _, settings, notes = run_guard(str(run))
    assert settings["threshold"] == 0.37 and settings["constrained"] is False   # as guard_eval_val ran
    assert notes == ["threshold 0.37 calibrated by compare_main on guard_eval_val",
                     "constrained: false as guard_eval_val evaluated"]
    assert run_guard(str(run), "loop0_train_c0")[1]["threshold"] == 0.2
    with pytest.raises(ConfigError, match="no finished guard-training stage 'loop9'"):
        run_guard(str(run), "loop9")
    json.dumps(settings)  # plain values: they go into Serve's args


def test_a_skipped_stage_gains_the_exports_of_its_kind(tmp_path):
    """A manifest written before a stage declared exports gains them when the run is resumed (the stage
    is skipped, nothing recomputes)."""
    from pipelines.core.rows import OK, make_row, to_table
    from pipelines.core.rundir import RunDir
    from pipelines.core.stage import Stage, run_stages

    class Exporter(Stage):
        name = "exporter"
        declared: dict | None = None
        unhashed = Stage.unhashed | {"declared"}  # a declaration, not an output (set on the built stage below)

        def expected_rows_in(self) -> int:
            return 1

        def exports(self, rundir):
            return self.declared

        def write(self, inputs, rundir):
            rundir.write_table(self.name, OK, to_table([make_row(id="a")]))

    rundir = RunDir(str(tmp_path / "run"))
    stage = Exporter({"x": 1})
    first = run_stages([stage], rundir)["exporter"]
    assert first["exports"] is None
    stage.declared = {"guard_model": {"folder": "model"}}
    again = run_stages([stage], rundir)["exporter"]
    assert again["finished_at"] == first["finished_at"]                       # skipped, not rerun
    assert rundir.read_manifest("exporter")["exports"] == {"guard_model": {"folder": "model"}}


def test_completion_from_the_engines_choice_or_its_json():
    from types import SimpleNamespace

    fields = {"tokens": ["unsafe", "\n", "B5"], "token_logprobs": [-0.1, 0.0, -0.2],
              "top_logprobs": [{"unsafe": -0.1, "safe": -2.4}, {"\n": 0.0}, {"B5": -0.2}]}
    as_json = Completion.from_choice({"index": 0, "text": "unsafe\nB5", "logprobs": fields})
    as_object = Completion.from_choice(SimpleNamespace(index=0, text="unsafe\nB5", logprobs=SimpleNamespace(**fields)))
    assert as_json == as_object == Completion(text="unsafe\nB5", **fields)
    assert Completion.from_choice({"text": "safe", "logprobs": None}) == Completion(text="safe")
