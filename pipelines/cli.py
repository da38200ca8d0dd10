"""The ``chillguard`` command line.

    chillguard run RECIPE [key=value ...] [--address ADDR] [--force] [--until STAGE[,STAGE]]
    chillguard config RECIPE [key=value ...] [--graph]
    chillguard graph RECIPE [key=value ...] [--dot] [--png OUT.png]
    chillguard status RUN_DIR
    chillguard serve [RUN_DIR] [--model PATH_OR_ID] [--config SERVE_YAML] [key=value ...] [--address ADDR]
    chillguard tiny-models OUT_DIR [--seed N]
    chillguard audit export RUN_DIR [--stage jury] [--n 300] [--seed S] [--floor F] [--out DIR]
    chillguard audit import RUN_DIR EXPORT.json [--out DIR]

Exit codes: 0 done; 2 a recipe problem, a status path that holds no run, an audit's unusable input
(a run without the stage, a file that is not a Label Studio export, tasks not in the run), or a run
directory on object storage that cannot be used (missing bucket, credentials, endpoint; told before Ray
starts); 3 training paused (``stop_after_steps``; run again to continue); 4 the run directory is in use by another run.
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
    if args.until:
        from pipelines.core.graph import GraphError, upstream_closure

        try:
            stages = upstream_closure(stages, [s.strip() for s in args.until.split(",") if s.strip()])
        except GraphError as exc:
            raise ConfigError(f"--until: {exc}") from None
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


def _cmd_audit(args) -> int:
    """Human audit: a stratified sample as Label Studio tasks, and its export back as a report."""
    from pipelines.labelling.audit_sample import AuditError

    try:
        if args.audit_command == "export":
            from pipelines.labelling.audit_sample import export_audit

            record = export_audit(args.run_dir, stage=args.stage, n=args.n, seed=args.seed, floor=args.floor,
                                  out=args.out)
            print(f"sampled {record['sampled']} of {record['rows']} rows of {record['stage']} "
                  f"({len(record['strata'])} strata): {', '.join(record['files'])}")
        else:
            from pipelines.labelling.audit_report import import_audit, interval_text

            report = import_audit(args.run_dir, args.export, out=args.out)
            where = args.out or f"{args.run_dir}/audit"
            print(f"{report['accounted']}; agreement {interval_text(report['overall']['agreement'])}, "
                  f"kappa {interval_text(report['overall']['kappa'])}: {where}/report.md")
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    p.add_argument("--until", metavar="STAGE[,STAGE]",
                   help="run only these stages and the stages they depend on (names as chillguard graph prints them)")
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

    p = sub.add_parser("audit", help="human audit of the jury: Label Studio tasks out, its export back in")
    audit = p.add_subparsers(dest="audit_command", required=True)
    a = audit.add_parser("export", help="a stratified sample (vote pattern x micro) as Label Studio import "
                         "tasks and a labelling config")
    a.add_argument("run_dir")
    a.add_argument("--stage", default="jury", help="the stage whose rows and votes to audit (default: jury; "
                   "final labels from its adjudicate stage where the run has one)")
    a.add_argument("--n", type=int, default=300, help="rows to sample (default 300)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--floor", type=int, default=5, help="rows at least per non-empty stratum (default 5)")
    a.add_argument("--out", help="folder for tasks.json and label_config.xml (default RUN_DIR/audit)")
    a = audit.add_parser("import", help="read Label Studio's JSON export back; write the audit report")
    a.add_argument("run_dir")
    a.add_argument("export", help="the project's export (Export -> JSON)")
    a.add_argument("--out", help="folder for report.json and report.md (default RUN_DIR/audit)")
    p.set_defaults(fn=_cmd_audit)

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
