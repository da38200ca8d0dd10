"""Shared ending of the benchmark scripts: print each target as met / MISSED, write the JSON."""

from __future__ import annotations

import json
from pathlib import Path


def finish(result: dict, out: str) -> None:
    for name, ok in result["targets"].items():
        print(f"  target {name}: {'met' if ok else 'MISSED'}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
