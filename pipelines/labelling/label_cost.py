"""What the labels cost, for the dataset card: judge calls, tokens per accepted label, and the human
audit's agreement where one was imported. Read from the manifests the jury and adjudicate stages wrote
(``summary.cost`` and the answer figures) and from ``RUN_DIR/audit/report.json``; pure functions of
those dicts."""

from __future__ import annotations

from typing import Any

from pipelines.core.reports import fmt


def _sum(values: list[int | None]) -> int | None:
    """A total of engine counts; ``None`` when no count was kept (an older run, or no LLM asked)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def labelling_cost(jury: dict[str, Any] | None, adjudicate: dict[str, Any] | None) -> dict[str, Any] | None:
    """Judge calls (per judge, per row) and prompt / completion tokens per accepted label.

    ``jury`` / ``adjudicate`` are the stages' manifests. Accepted labels are the rows with a final
    label: the adjudicate stage's safe + unsafe rows (the jury's majority labels without one). Tokens
    per accepted label = (every judge's tokens + the adjudicator's, retries included) / accepted
    labels; calls per row = judge calls / rows the jury saw."""
    cost = ((jury or {}).get("summary") or {}).get("cost")
    if not cost:
        return None
    judges = {j: {"calls": cost["calls"].get(j, 0), **(cost.get("tokens") or {}).get(j, {})} for j in cost["calls"]}
    adj_answers = (adjudicate or {}).get("answers") or {}
    adjudicator = {"calls": _sum([a.get("requests") for a in adj_answers.values()]),
                   "prompt": _sum([a.get("prompt_tokens") for a in adj_answers.values()]),
                   "completion": _sum([a.get("output_tokens") for a in adj_answers.values()])}
    summary = (adjudicate or {}).get("summary") or {}
    if adjudicate:
        accepted = (summary.get("safe") or 0) + (summary.get("unsafe") or 0)
    else:
        jury_summary = jury.get("summary") or {}
        accepted = (jury_summary.get("majority_safe") or 0) + (jury_summary.get("majority_unsafe") or 0)
    per_label = {}
    for kind in ("prompt", "completion"):
        total = _sum([t.get(kind) for t in judges.values()] + [adjudicator[kind]])
        per_label[kind] = total / accepted if total is not None and accepted else None
    return {"cascade": bool(cost.get("cascade")), "rows": cost.get("rows"), "calls_per_row": cost.get("calls_per_row"),
            "judges": judges, "adjudicator": adjudicator if adjudicate else None, "accepted_labels": accepted,
            "tokens_per_accepted_label": per_label}


def audit_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the card shows of an audit report (``chillguard audit import``): rows annotated,
    agreement and kappa with their intervals."""
    if not report:
        return None
    return {"annotated": report["accounted"]["annotated"], "agreement": report["overall"]["agreement"],
            "kappa": report["overall"]["kappa"], "intervals": report["intervals"]}


def _interval(figure: dict[str, Any]) -> str:
    if figure.get("value") is None:
        return "n/a"
    span = f" (95 % interval {fmt(figure['low'])}–{fmt(figure['high'])})" if figure.get("low") is not None else ""
    return f"{fmt(figure['value'])}{span}"


def cost_lines(cost: dict[str, Any] | None, audit: dict[str, Any] | None) -> list[str]:
    """The card's "Cost and human audit" section (empty when neither is known)."""
    lines = []
    if cost:
        calls = ", ".join(f"{j} {t['calls']}" for j, t in cost["judges"].items())
        per_label = cost["tokens_per_accepted_label"]
        lines += [f"- judge calls: {fmt(cost['calls_per_row'], 2)} per row over {cost['rows']} rows "
                  f"({'cascade' if cost['cascade'] else 'every judge asks every row'}); per judge: {calls}"]
        if cost["adjudicator"]:
            lines.append(f"- adjudicator calls (retries included): {cost['adjudicator']['calls'] or 0}")
        lines.append(f"- tokens per accepted label ({cost['accepted_labels']} labels, judges and adjudicator): "
                     f"prompt {fmt(per_label['prompt'], 1)}, completion {fmt(per_label['completion'], 1)}")
    if audit:
        lines.append(f"- human audit ({audit['annotated']} rows annotated): agreement with the final label "
                     f"{_interval(audit['agreement'])}, Cohen's kappa {_interval(audit['kappa'])} "
                     f"({audit['intervals']}; details: `audit/report.md` of the run)")
    return ["", "## Cost and human audit", "", *lines] if lines else []
