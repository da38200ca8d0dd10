"""What an LLM stage's answers look like, before its parser reads them: requests, failed requests,
empty answers, refusals, the answers' language and length, per model role.

Every request of every LLM stage goes through ``actors.llm.chat``; as its answers arrive, the Ray
workers write each batch's figures (:func:`batch_answer_stats`) as a small JSON file under the
stage's scratch folder (:func:`set_answer_log`, set by the runner). When the stage ends the runner
merges them (:func:`merge_answer_stats`) into the manifest's ``answers``, next to its row reasons
(what the parser made of the answers: ``unparseable_output``, ``invalid_json``, abstentions ...).
``chillguard status`` and the run's reports show them. A stage resumed after a crash also counts the
answers of blocks the killed run had received but not written (they are asked again).
"""

from __future__ import annotations

import contextvars
import json
import statistics
import uuid
from collections import Counter
from typing import Any

from pipelines.core.parsing import looks_like_refusal, strip_thinking

#: where the workers of the stage this driver thread runs write their batch figures ("" outside a
#: run); a context variable, so that stages run side by side in threads keep their own
_LOG: contextvars.ContextVar[str] = contextvars.ContextVar("answer_log", default="")


def set_answer_log(uri: str) -> None:
    _LOG.set(uri)


def answer_log() -> str:
    """The folder (URI) for the running stage's answer figures; pass it to the workers with the work."""
    return _LOG.get()


def answer_language(text: str) -> str:
    """``zh`` when at least 30 % of the letters are CJK ideographs, ``en`` when most letters are
    ASCII, ``other`` otherwise (no letters: ``other``). A cheap tag for "did the model answer in
    the language asked", not language identification."""
    cjk = sum("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in text)
    ascii_letters = sum(c.isascii() and c.isalpha() for c in text)
    letters = sum(c.isalpha() for c in text)
    if not letters:
        return "other"
    if cjk / letters >= 0.3:
        return "zh"
    return "en" if ascii_letters / letters > 0.5 else "other"


def batch_answer_stats(outputs: list[str], errors: list[str], prompt_tokens: list[int] | None = None,
                       output_tokens: list[int] | None = None) -> dict[str, Any]:
    """One batch's figures: ``requests``, ``failed`` (the request errored), ``empty`` (nothing left
    after the reasoning), ``refusals`` (:func:`looks_like_refusal`), ``languages`` of the non-empty
    answers and their ``chars`` (lengths, kept for the median), and the ``prompt_tokens`` /
    ``output_tokens`` the engine counted."""
    answers = [strip_thinking(o or "") for o, e in zip(outputs, errors) if not e]
    spoken = [a for a in answers if a]
    return {"requests": len(outputs), "failed": len(outputs) - len(answers),
            "empty": len(answers) - len(spoken), "refusals": sum(looks_like_refusal(a) for a in spoken),
            "languages": dict(Counter(answer_language(a) for a in spoken)), "chars": [len(a) for a in spoken],
            "prompt_tokens": sum(prompt_tokens or []), "output_tokens": sum(output_tokens or [])}


def merge_answer_stats(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``[(role, batch figures), ...]`` -> per role: the counts summed, the languages' shares of
    the non-empty answers, and the median answer length in characters."""
    merged: dict[str, dict[str, Any]] = {}
    for role, part in parts:
        m = merged.setdefault(role, {"requests": 0, "failed": 0, "empty": 0, "refusals": 0,
                                     "prompt_tokens": 0, "output_tokens": 0, "languages": Counter(), "chars": []})
        for key in ("requests", "failed", "empty", "refusals", "prompt_tokens", "output_tokens"):
            m[key] += part.get(key, 0)  # (token counts: batch files written before they were kept have none)
        m["languages"].update(part["languages"])
        m["chars"].extend(part["chars"])
    out = {}
    for role, m in sorted(merged.items()):
        spoken = len(m["chars"])
        out[role] = {"requests": m["requests"], "failed": m["failed"], "empty": m["empty"],
                     "refusals": m["refusals"], "prompt_tokens": m["prompt_tokens"],
                     "output_tokens": m["output_tokens"],
                     "languages": {k: round(v / spoken, 4) for k, v in sorted(m["languages"].items())},
                     "median_chars": statistics.median(m["chars"]) if spoken else None}
    return out


def write_batch_stats(folder: str, role: str, stats: dict[str, Any]) -> None:
    """One JSON file per batch under ``folder`` (a local path or object-store URI)."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(folder)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{uuid.uuid4().hex}.json") as f:
        f.write(json.dumps({"role": role, **stats}).encode())


def read_answer_stats(folder: str) -> dict[str, dict[str, Any]] | None:
    """The merged figures of every batch file under ``folder``; ``None`` when the stage asked no LLM."""
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(folder)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    parts = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        if info.path.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                data = json.loads(f.read())
            parts.append((data.pop("role"), data))
    return merge_answer_stats(parts) if parts else None


def answer_quality_line(role: str, stats: dict[str, Any]) -> str:
    """One line for ``chillguard status``:
    ``role: 300 requests, 0 failed, 1 empty, 2 refused, zh 97%, median 14 chars``."""
    languages = ", ".join(f"{k} {v:.0%}" for k, v in sorted(stats["languages"].items(), key=lambda kv: -kv[1]))
    median = "n/a" if stats["median_chars"] is None else f"{stats['median_chars']:g}"
    return (f"{role}: {stats['requests']} requests, {stats['failed']} failed, {stats['empty']} empty, "
            f"{stats['refusals']} refused, {languages or 'no answers'}, median {median} chars")
