"""``chillguard serve``: deploy the guard app on the embedded Ray or a cluster.

Settings, later ones winning: the Serve config's ``applications[0].args`` (``--config``; default
``configs/serve/guard.yaml``, or ``configs/serve/cpu.yaml`` when this machine has no CUDA and no
cluster is named), what ``RUN_DIR`` says about its guard (:func:`pipelines.serve.app.run_guard`),
``--model``, then ``key=value`` overrides. On the embedded Ray the command serves until Ctrl-C /
SIGTERM and then shuts Serve down; on a cluster it deploys the app and returns (``serve status``,
``serve shutdown`` manage it there).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.core.config import CONFIGS, ConfigError, validate_settings
from pipelines.core.yaml_files import read_yaml_file
from pipelines.serve.app import APP_NAME, ROUTE_PREFIX, run_guard
from pipelines.serve.config import GuardServeConfig

log = logging.getLogger(__name__)

SERVE_CONFIGS = CONFIGS / "serve"


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def serve_settings(args, *, cuda: bool) -> tuple[GuardServeConfig, dict[str, Any], str]:
    """``(config, http_options, what)``: the validated settings, the Serve HTTP options and a line
    saying what is served. ``cuda``: whether the engine can have a GPU here (picks the default config)."""
    overrides = list(args.overrides)
    run_dir = args.run_dir
    if run_dir and "=" in run_dir and not Path(run_dir).exists():  # `chillguard serve threshold=0.3`
        overrides.insert(0, run_dir)
        run_dir = None
    if run_dir and args.model:
        raise ConfigError("give RUN_DIR or --model, not both")
    path = Path(args.config) if args.config else SERVE_CONFIGS / ("guard.yaml" if cuda else "cpu.yaml")
    data = read_yaml_file(path, "serve config", ConfigError) or {}
    apps = data.get("applications") if isinstance(data, dict) else None
    if not apps or not isinstance(apps[0], dict) or not isinstance(apps[0].get("args"), dict):
        raise ConfigError(f"{path}: expected a Serve config with applications[0].args (the guard's settings)")
    settings = dict(apps[0]["args"])
    what = f"{settings.get('model')} (from {path})"
    if run_dir:
        stage, found, notes = run_guard(run_dir, args.stage)
        settings = _merge(settings, found)
        what = f"{found['model']} (stage {stage} of run {run_dir}{''.join('; ' + n for n in notes)})"
    elif args.stage:
        raise ConfigError("--stage needs RUN_DIR")
    if args.model:
        settings["model"] = args.model
        what = args.model
    config = validate_settings(GuardServeConfig, settings, f"serve settings ({path})", overrides)
    http = dict(data.get("http_options") or {})
    http["host"] = args.host or http.get("host") or config.host
    http["port"] = args.port or http.get("port") or config.port
    return config, http, what


def route_lines(config: GuardServeConfig) -> list[str]:
    """One line per route of the served app (``pipelines.serve.ingress``), as the serve command prints them."""
    proxy = (f"guarded OpenAI chat, upstream {config.proxy.upstream_base_url}" if config.proxy.upstream_base_url
             else "guarded OpenAI chat: 404 until proxy.upstream_base_url is set")
    return ["POST /v1/moderations          OpenAI-style moderation (our codes, or OpenAI's categories by model)",
            "POST /v1/guard                verdict, P(unsafe) and micro code; per-request policy",
            "POST /v1/moderations/stream   streaming moderation (NDJSON chunks in, server-sent events out)",
            f"POST /v1/chat/completions     {proxy}",
            "GET  /readyz                  200 once a warm-up guard request went through the engine",
            "GET  /healthz                 liveness (200 while the engine loads)",
            "GET  /                        playground"]


def wait_until_ready(url: str, started: float, *, every_s: float = 5.0, timeout_s: float | None = None,
                     report: Callable[[str], None] | None = None,
                     stop: threading.Event | None = None) -> float | None:
    """Poll ``url/readyz`` until it answers 200 and return the seconds since ``started`` (a
    ``time.monotonic()``, the deployment's), so that "ready" means a request is answered at normal speed
    (the engine loaded and warmed up). ``report`` gets each change of state and the final line (the
    serve command prints them); past ``timeout_s`` a ``TimeoutError``; ``None`` once ``stop`` is set (the
    command was asked to stop while waiting)."""
    import urllib.error
    import urllib.request

    stop = stop or threading.Event()  # sleeps between polls as an interruptible wait
    last = ""
    while not stop.is_set():
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=every_s):
                waited = time.monotonic() - started
                if report:
                    report(f"ready after {waited:.0f} s")
                return waited
        except urllib.error.HTTPError as exc:  # 503 while warming up: the body says which state
            try:
                state = json.loads(exc.read()).get("status", str(exc.code))
            except ValueError:
                state = str(exc.code)
        except OSError as exc:  # the HTTP proxy is not listening yet
            state = type(exc).__name__
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{url}/readyz not ready within {timeout_s:g} s (last: {state})")
        if report and state != last:
            report(f"waiting for readiness ({state}) ...")
            last = state
        stop.wait(every_s)
    return None


def serve_command(args) -> int:
    from cluster.connect import connect, cuda_device_count
    from pipelines.core.config import ClusterConfig

    address = args.address or os.environ.get("RAY_ADDRESS")
    cuda = bool(address) or cuda_device_count() > 0
    try:
        config, http, what = serve_settings(args, cuda=cuda)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ray import serve

    from pipelines.serve.app import build_app

    connect(ClusterConfig(), address)
    stop = threading.Event()
    if not address:  # the embedded Ray: Ctrl-C / SIGTERM, even while deploying or warming up, shut Serve down
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": http["host"], "port": http["port"]})
    started = time.monotonic()
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE_PREFIX, blocking=False)
    url = f"http://{http['host']}:{http['port']}"
    print(f"serving {what} at {url}", flush=True)
    for line in route_lines(config):
        print(f"  {line}", flush=True)
    if address:
        print(f"deployed on {address}: `serve status` shows it, `serve shutdown` removes it; "
              f"{url}/readyz answers 200 once it is ready")
        return 0
    wait_until_ready(url, started, report=lambda line: print(line, flush=True), stop=stop)
    stop.wait()
    log.info("shutting the guard down")
    serve.shutdown()
    return 0

