"""Shared parts of the benchmark scripts: output arguments, a fresh work folder, and the ending
(print each target as met / MISSED, write the JSON)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    """``--workdir bench_out/<name>``, ``--out bench_out/<name>.json``, ``--seed 0``."""
    parser.add_argument("--workdir", default=f"bench_out/{name}")
    parser.add_argument("--out", default=f"bench_out/{name}.json")
    parser.add_argument("--seed", type=int, default=0)


def fresh_dir(path: str | Path) -> Path:
    """``path`` emptied and created, absolute."""
    work = Path(path).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def finish(result: dict, out: str) -> None:
    for name, ok in result["targets"].items():
        print(f"  target {name}: {'met' if ok else 'MISSED'}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
