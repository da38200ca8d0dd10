"""Shared parts of the benchmark scripts: output arguments, a fresh work folder, the ending
(print each target as met / MISSED, write the JSON), and when a steady-state rate can be read off."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
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
    """Print each target as met, MISSED, or n/a (``None``: its figure was not measured in this run), and
    write ``result`` as JSON to ``out``."""
    for name, ok in result["targets"].items():
        print(f"  target {name}: {'n/a (not measured in this run)' if ok is None else 'met' if ok else 'MISSED'}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


@dataclass(frozen=True)
class SteadyRule:
    """When a marginal rate after warm-up is a steady-state rate rather than the drain of a buffer.

    Rows must arrive as a stream: enough rows and separate output batches after warm-up, arriving in
    most equal time slices of the steady window, and that window must be most of the run (from the
    variant's start to its last row): rows that all appear late, even as many batches, are a buffer
    draining, and dividing their tokens by the drain's few seconds gives a meaningless rate.
    """

    min_rows: int = 1000            # rows after the warm-up
    min_batches: int = 20           # distinct production times after the warm-up
    bins: int = 10                  # the steady window cut into this many equal time slices ...
    min_bins_share: float = 0.8     # ... of which at least this share receive rows
    min_window_share: float = 0.5   # steady window / (start -> last row)


def steady_rate(done: list[float], tokens: list[int], warm: int, start: float,
                rule: SteadyRule = SteadyRule()) -> dict:
    """Steady-state tokens/s from per-row production times, or ``tok_per_s=None`` and ``why_na``.

    With rows sorted by production time ``t`` and the window starting at the warm-th row,
    ``s = t[warm-1]``::

        rate = sum(tokens of rows with t > s) / (t[-1] - s)

    (rows of the warm-th row's own batch belong to the warm-up); ``start`` is when the variant's
    clock started (before engine start-up), the same clock as ``done``. Reported only when every condition
    of ``rule`` holds; the first that fails is ``why_na``. Rows stamped by one output batch share
    one time, so distinct times count batches.
    """
    import numpy as np

    if len(done) != len(tokens):
        raise ValueError(f"steady_rate: {len(done)} times but {len(tokens)} token counts")
    if warm < 1:
        raise ValueError(f"steady_rate: warm must be >= 1, got {warm}")
    order = np.argsort(np.asarray(done, dtype=float), kind="stable")
    t = np.asarray(done, dtype=float)[order]
    tok = np.asarray(tokens, dtype=float)[order]
    if len(t) and t[0] < start:
        raise ValueError(f"steady_rate: a row produced at {t[0]} before the start {start}")
    begin = t[warm - 1] if warm <= len(t) else float("inf")
    after = t > begin
    steady, end = t[after], t[-1] if len(t) else begin
    out = {"tok_per_s": None, "why_na": None, "steady_rows": int(after.sum()),
           "steady_tokens": int(tok[after].sum()), "steady_s": None, "batches": 0,
           "bins_with_rows": 0, "window_share": None}
    if out["steady_rows"] < rule.min_rows:
        out["why_na"] = (f"{out['steady_rows']} rows produced after the {warm}th (the warm-up), "
                         f"fewer than {rule.min_rows}: run more prompts")
        return out
    out["batches"] = len(np.unique(steady))
    out["steady_s"] = float(end - begin)
    if out["batches"] < rule.min_batches:
        out["why_na"] = (f"rows after warm-up arrived at {out['batches']} distinct times, "
                         f"fewer than {rule.min_batches}: they came in bursts")
        return out
    counts, _ = np.histogram(steady, bins=rule.bins, range=(begin, end))
    out["bins_with_rows"] = int((counts > 0).sum())
    if out["bins_with_rows"] < rule.min_bins_share * rule.bins:
        out["why_na"] = (f"rows after warm-up arrived in {out['bins_with_rows']} of {rule.bins} equal "
                         f"time slices (need {rule.min_bins_share:.0%}): they came in bursts")
        return out
    out["window_share"] = float((end - begin) / (end - start))
    if out["window_share"] < rule.min_window_share:
        out["why_na"] = (f"the steady window is {out['window_share']:.0%} of the run "
                         f"(need {rule.min_window_share:.0%}): rows came late, a buffer draining; "
                         f"run more prompts")
        return out
    out["tok_per_s"] = float(out["steady_tokens"] / (end - begin))
    return out
