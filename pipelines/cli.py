"""The ``chillguard`` command line.

    chillguard run RECIPE [key=value ...] [--address ADDR] [--force]
    chillguard config RECIPE [key=value ...] [--graph]
    chillguard graph RECIPE [key=value ...] [--dot] [--png OUT.png]
    chillguard status RUN_DIR
    chillguard serve [RUN_DIR] [--model PATH_OR_ID] [--config SERVE_YAML] [key=value ...] [--address ADDR]
    chillguard tiny-models OUT_DIR [--seed N]

Exit codes: 0 done; 2 a recipe problem, a status path that holds no run, or a run directory on object
storage that cannot be used (missing bucket, credentials, endpoint; told before Ray starts); 3 training
paused (``stop_after_steps``; run again to continue); 4 the run directory is in use by another run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.construction import load_recipe
from pipelines.core.config import ConfigError, dump_recipe, env_address


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _cmd_run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)  # fails fast, before Ray starts
    from cluster.connect import connect
    from pipelines.construction import build_stages, run_recipe
    from pipelines.core.rundir import RunDir
    from pipelines.core.stage import status_table

    stages = build_stages(recipe)  # templates are read and checked before the cluster starts
    from pipelines.training.train_loop import TrainingPaused

    rundir = RunDir(recipe.run_dir)
    with rundir.lock():  # before Ray starts: a second run on the same directory stops here
        address = env_address(args.address, recipe)
        connect(recipe.cluster, address)
        try:
            run_recipe(recipe, stages, force=args.force, max_concurrent=recipe.cluster.concurrent_stages(address))
        except TrainingPaused as exc:
            print(status_table(rundir))
            print(f"paused: {exc}", file=sys.stderr)
            return 3
    print(status_table(rundir))
    return 0


def _cmd_config(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.graph:
        from pipelines.construction import build_stages
        from pipelines.core.graph import graph_text

        print(graph_text(build_stages(recipe)), end="")
    else:
        print(dump_recipe(recipe), end="")
    return 0


def _cmd_graph(args) -> int:
    """The recipe's stages as a graph: text (run order, each with what it reads), DOT, PNG."""
    from pipelines.construction import build_stages
    from pipelines.core.graph import graph_dot, graph_text, write_graph_png

    recipe = load_recipe(args.recipe, args.overrides)
    stages = build_stages(recipe)
    if args.png:
        write_graph_png(stages, args.png, title=f"{recipe.name}: {len(stages)} stages in run order")
        print(f"wrote {args.png}", file=sys.stderr)
    if args.dot:
        print(graph_dot(stages, title=recipe.name), end="")
    elif not args.png:
        print(graph_text(stages), end="")
    return 0


def _cmd_status(args) -> int:
    from pipelines.core.rundir import NotARunDir, RunDir
    from pipelines.core.stage import status_table

    rundir = RunDir(args.run_dir, create=False)
    try:
        rundir.check_is_run_dir()
    except NotARunDir as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(status_table(rundir))
    return 0


def _cmd_serve(args) -> int:
    from pipelines.serve.cli import serve_command

    return serve_command(args)


def _cmd_tiny_models(args) -> int:
    from pipelines.training.tiny_models import build_tiny_models

    for name, path in build_tiny_models(args.out_dir, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chillguard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe (resumes finished stages)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.rewrite.max_outputs=3")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--force", action="store_true", help="recompute every stage")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("config", help="print the fully resolved recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--graph", action="store_true",
                   help="print the stages in run order with what each reads and requires instead")
    p.set_defaults(fn=_cmd_config)

    p = sub.add_parser("graph", help="the stages' graph of declared inputs: text, Graphviz DOT or PNG")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--dot", action="store_true", help="print Graphviz DOT instead of text")
    p.add_argument("--png", metavar="OUT.png", help="draw the graph (layers by depth) into this PNG file")
    p.set_defaults(fn=_cmd_graph)

    p = sub.add_parser("status", help="table of stages and row counts of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(fn=_cmd_status)

    p = sub.add_parser("serve", help="serve a guard over HTTP with Ray Serve (/v1/moderations, /v1/guard, /)")
    p.add_argument("run_dir", nargs="?", help="serve the guard this run trained (its last guard-training stage)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the serve settings, e.g. threshold=0.3")
    p.add_argument("--model", help="serve this HF id or model folder instead of a run's guard")
    p.add_argument("--stage", help="with RUN_DIR: the guard-training stage to serve (default: the last)")
    p.add_argument("--config", help="Serve config YAML (default: configs/serve/guard.yaml, or "
                   "configs/serve/cpu.yaml on an embedded Ray without CUDA)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--host", help="bind address (default: the config's http_options, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: the config's, 8000)")
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("tiny-models", help="build the offline tiny tokenizer + Qwen3 models")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_tiny_models)

    args = parser.parse_args(argv)
    _setup_logging()
    from pipelines.core.rundir import RunDirLocked, RunDirUnavailable

    try:
        return args.fn(args)
    except (ConfigError, RunDirUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunDirLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
