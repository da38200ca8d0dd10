"""The loop's ablation report (the seed's Tables 3–4), ``loop_report``: every evaluated classifier
side by side on the same test rows, and what the loop did to get there.

Written to ``RUN_DIR/loop_report/report/``:

- ``report.json``: per system (c0, c1, c2, c2_dpo) the overall precision / recall / F1 and the
  per-macro and per-micro F1, copied from its evaluation stage's ``metrics.json`` (the guard
  evaluation harness computed them from that stage's rows); the candidates' levels and the pairs'
  types per micro category (from ``loop2_score`` / ``loop2_pairs`` rows); MDPO / DPO training
  curves (β_M, R̄, reward accuracy per step, from the training logs); each loop stage's wall time;
  with ``relabel: jury``, the label drift of each generation's candidates (per generator and per micro
  category, with example ids *and texts*: this report stays in the run directory) and the levels and
  pair types of the same candidates by the jury's label and by the seed's label;
- ``report.md``: the same as tables;
- ``f1_by_system.png`` (overall and per-macro F1, bars per system) and ``generator_training.png``.

No rows of its own: it reads finished stages (its ``requires``), so it reruns when any of them does.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pipelines.core.reports import fmt, png_bytes
from pipelines.core.rows import ERROR, OK
from pipelines.core.stage import Stage
from pipelines.core.taxonomy import load_taxonomy
from pipelines.loop.drift import label_drift
from pipelines.loop.pairs import ACCOUNTING
from pipelines.loop.relabel import outcome_rows
from pipelines.training.stage import read_metrics

REPORT_DIR = "report"
SYSTEM_NAMES = {"c0": "C0 (iteration 0 only)", "c1": "C1 (iteration 1 only)", "c2": "C2 (MDPO, full)",
                "c2_dpo": "C2 with DPO"}
CURVES = ("beta_m", "running_mean", "reward_accuracy", "loss")
LEVEL_COLUMNS = ["L1", "L2", "L3", "L4", "ineligible"]
PAIR_TYPES = ["<L1,L4>", "<L1,L3>", "<L2,L4>"]


def eval_stage(system: str) -> str:
    """The stage evaluating the loop's classifier ``system`` (c0, c1, c2, c2_dpo) on the test split."""
    iteration = {"c0": 0, "c1": 1}.get(system, 2)
    return f"loop{iteration}_eval_{system}"


def system_metrics(metrics: dict) -> dict[str, Any]:
    """The figures of one system's evaluation ``metrics.json`` the report compares."""
    o = metrics["overall"]
    return {"rows": metrics["rows"]["evaluated"], "unparsed": metrics["rows"]["unparsed"],
            "precision": o["precision"], "recall": o["recall"], "f1": o["f1"],
            "tp": o["tp"], "fp": o["fp"], "fn": o["fn"], "tn": o["tn"],
            "per_macro_f1": {k: m["f1"] for k, m in metrics["per_macro"].items()},
            "per_micro_f1": {k: m["f1"] for k, m in metrics["per_micro"].items() if m["rows"]},
            "model": metrics["settings"]["model"]}


def candidate_levels(rundir, scored: str = "loop2_score", labelled: str = "loop2_label") -> list[tuple[str, str]]:
    """``(micro, level or "ineligible")`` of every candidate the classifier was asked about: the scored
    ones, the unscored ones (the score stage's errors) and those without a usable answer (the
    labelling stage's errors, which never reach scoring)."""
    out = []
    for stage, status in ((scored, OK), (scored, ERROR), (labelled, ERROR)):
        micros = rundir.column_values(stage, status, "micro")
        # an error row's `level` is no difficulty level (the labelling stage's is "prompt")
        levels = rundir.column_values(stage, OK, "level") if status == OK else [""] * len(micros)
        out += [(micro, level or "ineligible") for micro, level in zip(micros, levels)]
    return out


def drift_with_texts(rundir, stage: str) -> dict[str, Any]:
    """:func:`~pipelines.loop.drift.label_drift` of a relabelling stage's candidates, with ``texts``:
    the example ids' texts (for the local report only; the manifest summary keeps ids)."""
    rows = outcome_rows(rundir, stage)
    drift = label_drift(rows)
    shown = {i for g in (drift["total"], *drift["by_generator"].values(), *drift["by_micro"].values())
             for i in g["examples"]}
    texts = {r["id"]: {"text": r["text"], "seed_label": r["seed_label"], "jury_label": r["jury_label"]}
             for r in rows if r["id"] in shown}
    return {**drift, "texts": dict(sorted(texts.items()))}


def relabel_markdown(relabel: dict[str, Any]) -> list[str]:
    """The drift tables and the seed-label / jury-label comparison of the pairs stage's accounting."""
    lines = ["", "## Relabelled rewrites (`relabel: jury`)", "",
             "Drift: the share of the candidates the jury labelled whose label differs from their seed's."]
    header = ["", "| group | candidates | jury-labelled | changed | share | unsafe→safe | safe→unsafe | examples |",
              "|---|---|---|---|---|---|---|---|"]

    def row(name: str, g: dict) -> str:
        return (f"| {name} | {g['candidates']} | {g['labelled']} | {g['changed']} | {fmt(g['share'])} | "
                f"{g['unsafe_to_safe']} | {g['safe_to_unsafe']} | {', '.join(g['examples'])} |")

    for stage, drift in relabel["drift"].items():
        lines += ["", f"### {stage}", *header, row("all", drift["total"])]
        lines += [row(f"generator {g}", d) for g, d in drift["by_generator"].items()]
        lines += [row(f"micro {m}", d) for m, d in drift["by_micro"].items()]
        if drift["texts"]:
            lines += ["", "Examples (seed label → jury label):", ""]
            lines += [f"- `{i}` {t['seed_label']} → {t['jury_label']}: {t['text']}" for i, t in drift["texts"].items()]
    acc = relabel.get("comparison")
    if acc:
        lines += ["", "### Levels and pairs of the same candidates (`loop2_pairs`)", "",
                  "| y* | " + " | ".join(LEVEL_COLUMNS) + " | pairs | " + " | ".join(PAIR_TYPES) + " |",
                  "|---|" + "---|" * (len(LEVEL_COLUMNS) + 1 + len(PAIR_TYPES))]
        for name, version in (("jury's label (used)", acc), ("seed's label", acc["seed_label"])):
            types, levels = version["pair_types"], version["levels"]
            cells = [*(levels.get(c, 0) for c in LEVEL_COLUMNS), sum(types.values()),
                     *(types.get(t, 0) for t in PAIR_TYPES)]
            lines.append(f"| {name} | " + " | ".join(map(str, cells)) + " |")
    return lines


def read_curves(rundir, stage: str) -> list[dict[str, float]]:
    """Per step of a generator training stage: its step and :data:`CURVES`."""
    return [{"step": r["step"], **{k: r[k] for k in CURVES if k in r}} for r in read_metrics(rundir, stage)]


def markdown(report: dict, taxonomy) -> str:
    systems = report["systems"]
    names = list(systems)
    lines = ["# Generator–classifier loop: ablation report", ""]
    if names:
        rows = next(iter(systems.values()))["rows"]
        lines += [f"Every system on the same {rows} test rows (F1 with `unsafe` positive; an unusable answer "
                  "counts as wrong).", "", "| system | precision | recall | F1 | " +
                  " | ".join(f"{m} F1" for m in taxonomy.macro_codes) + " |",
                  "|---|---|---|---|" + "---|" * len(taxonomy.macro_codes)]
        for name, m in systems.items():
            lines.append(f"| {SYSTEM_NAMES[name]} | {fmt(m['precision'])} | {fmt(m['recall'])} | {fmt(m['f1'])} | "
                         + " | ".join(fmt(m["per_macro_f1"].get(c)) for c in taxonomy.macro_codes) + " |")
        micros = sorted({c for m in systems.values() for c in m["per_micro_f1"]}, key=taxonomy.micro_codes.index)
        lines += ["", "## Per micro category (F1)", "", "| micro | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for code in micros:
            lines.append(f"| {code} | " + " | ".join(fmt(systems[n]["per_micro_f1"].get(code)) for n in names) + " |")
    levels = report["levels"]
    if levels["by_micro"]:
        cols = LEVEL_COLUMNS
        by = " (levels by the seed's label, pairs by the jury's: see Relabelled rewrites)" if report.get("relabel") \
            else ""
        lines += ["", f"## Candidate levels (iteration 2, C1's labels and G0's scores){by}", "",
                  "| micro | " + " | ".join(cols) + " | pairs | " + " | ".join(report["pairs"]["types"]) + " |",
                  "|---|" + "---|" * (len(cols) + 1 + len(report["pairs"]["types"]))]
        for code, counts in levels["by_micro"].items():
            pairs = report["pairs"]["by_micro"].get(code, {})
            lines.append(f"| {code} | " + " | ".join(str(counts.get(c, 0)) for c in cols)
                         + f" | {sum(pairs.values())} | "
                         + " | ".join(str(pairs.get(t, 0)) for t in report["pairs"]["types"]) + " |")
        lines.append("| all | " + " | ".join(str(levels["total"].get(c, 0)) for c in cols)
                     + f" | {report['pairs']['total']} | "
                     + " | ".join(str(report["pairs"]["type_totals"].get(t, 0)) for t in report["pairs"]["types"])
                     + " |")
    labelling = report.get("labelling")
    if labelling and labelling["threshold"] is not None:
        how = labelling["calibration"]
        lines += ["", f"C1 labelled a candidate unsafe when P(unsafe) >= {fmt(labelling['threshold'])}" + (
            f", the best-F1 threshold on `{how['from']}` ({how['rows']} rows, {how['gold_unsafe']} unsafe; "
            f"F1 {fmt(how['f1'])} there)." if how else ".")]
    accounting = report["pairs"].get("accounting")
    if accounting:
        lines += ["", f"Per seed (`loop2_pairs`): {accounting['candidates']} candidates = {accounting['paired']} in "
                  f"pairs + unpaired {accounting['unpaired']} + ineligible {accounting['ineligible']}."]
    if report.get("relabel"):
        lines += relabel_markdown(report["relabel"])
    for stage, curve in report["generator_training"].items():
        if curve:
            last = curve[-1]
            lines += ["", f"## {stage}: {len(curve)} steps", "",
                      "final " + ", ".join(f"{k} {fmt(last.get(k))}" for k in CURVES if k in last)]
    lines += ["", "## Wall time per loop stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in report["seconds"].items()]
    return "\n".join(lines) + "\n"


def f1_chart(systems: dict[str, dict], macro_codes: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["overall", *macro_codes]
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=110)
    width = 0.8 / max(1, len(systems))
    for i, (name, m) in enumerate(systems.items()):
        values = [m["f1"], *(m["per_macro_f1"].get(c) for c in macro_codes)]
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=SYSTEM_NAMES[name])
        for x, v in zip(xs, values):
            ax.text(x, (v or 0.0) + 0.02, "n/a" if v is None else f"{v:.2f}", ha="center", va="bottom",
                    rotation=90, fontsize=7)
    ax.set_xticks([g + width * (len(systems) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("F1 (unsafe positive)")
    ax.set_title("Loop ablation: overall and per-macro F1 on the test split", fontsize=10)
    ax.legend(fontsize=7, ncol=len(systems), loc="upper right", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)


def curves_chart(curves: dict[str, list[dict]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("beta_m", "running_mean", "reward_accuracy")
    fig, axes = plt.subplots(1, len(keys), figsize=(10, 3.2), dpi=110)
    for ax, key in zip(axes, keys):
        for stage, curve in curves.items():
            points = [(r["step"], r[key]) for r in curve if key in r]
            if points:
                ax.plot(*zip(*points), marker=".", label=stage)
        ax.set_title({"beta_m": "β_M", "running_mean": "R̄", "reward_accuracy": "reward accuracy"}[key], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return png_bytes(fig)


class LoopReportStage(Stage):
    """``loop_report``: the ablation report over the loop's finished stages."""

    name = "loop_report"

    #: wiring: the drift stages are among its requires (in the input fingerprint)
    unhashed = Stage.unhashed | {"drift_stages"}

    def __init__(self, loop_stages: list[str], *, systems: list[str], taxonomy_path: str,
                 drift_stages: list[str] | tuple[str, ...] = ()):
        super().__init__(requires=loop_stages)
        # what the report counts of the rows of the loop's stages (their reports it reads as files)
        counted = {"loop2_score": frozenset({"micro", "level"}), "loop2_pairs": frozenset({"micro", "pair_type"}),
                   **{name: frozenset({"id", "text", "label", "source_label"}) for name in drift_stages}}
        self.reads = {name: columns for name, columns in counted.items() if name in self.requires}
        self.drift_stages = [name for name in drift_stages if name in self.requires]
        self.systems = list(systems)
        self.taxonomy = load_taxonomy(taxonomy_path)  # the report's per-category tables name the categories

    def report(self, rundir) -> dict[str, Any]:
        taxonomy = self.taxonomy
        systems = {}
        for system in self.systems:
            text = rundir.read_text(f"{eval_stage(system)}/{REPORT_DIR}/metrics.json")
            if text is None:
                raise FileNotFoundError(f"{eval_stage(system)} wrote no report/metrics.json")
            systems[system] = system_metrics(json.loads(text))
        by_micro: dict[str, Counter] = {}
        total: Counter = Counter()
        if "loop2_score" in self.requires:
            for micro, key in candidate_levels(rundir):
                by_micro.setdefault(micro or "-", Counter())[key] += 1
                total[key] += 1
        pair_micro: dict[str, Counter] = {}
        if "loop2_pairs" in self.requires:
            for micro, kind in zip(rundir.column_values("loop2_pairs", OK, "micro"),
                                   rundir.column_values("loop2_pairs", OK, "pair_type")):
                pair_micro.setdefault(micro or "-", Counter())[kind] += 1
        type_totals = sum(pair_micro.values(), Counter())
        order = {c: i for i, c in enumerate([*taxonomy.micro_codes, "-"])}
        manifests = rundir.manifests()
        label = json.loads(rundir.read_text(f"loop2_label/{REPORT_DIR}/metrics.json") or "null") \
            if "loop2_label" in self.requires else None
        accounting = json.loads(rundir.read_text(f"loop2_pairs/{ACCOUNTING}") or "null") \
            if "loop2_pairs" in self.requires else None
        relabel = {"drift": {s: drift_with_texts(rundir, s) for s in self.drift_stages},
                   "comparison": accounting if accounting and "seed_label" in accounting else None} \
            if self.drift_stages else None
        return {
            # how C1 decided ŷ: its threshold, and where a calibration chose it, on which rows
            "labelling": {"threshold": label["settings"].get("threshold"),
                          "calibration": label["settings"].get("threshold_calibration")} if label else None,
            "systems": systems,
            "levels": {"by_micro": {m: dict(c)
                                    for m, c in sorted(by_micro.items(), key=lambda kv: order.get(kv[0], 99))},
                       "total": dict(total)},
            "pairs": {"by_micro": {m: dict(c)
                                   for m, c in sorted(pair_micro.items(), key=lambda kv: order.get(kv[0], 99))},
                      "type_totals": dict(type_totals), "total": sum(type_totals.values()),
                      "types": ["<L1,L4>", "<L1,L3>", "<L2,L4>"],
                      # a one-iteration loop has no pairs stage (a run directory may still hold an old one)
                      "accounting": accounting},
            "relabel": relabel,
            "generator_training": {s: read_curves(rundir, s) for s in self.requires
                                   if s in ("loop2_mdpo", "loop2_dpo")},
            "seconds": {s: manifests[s]["seconds"] for s in self.requires if manifests.get(s)},
        }

    def write(self, inputs: dict, rundir) -> None:
        taxonomy = self.taxonomy
        report = self.report(rundir)
        base = f"{self.name}/{REPORT_DIR}"
        rundir.write_text(f"{base}/report.json", json.dumps(report, indent=2, ensure_ascii=False))
        rundir.write_text(f"{base}/report.md", markdown(report, taxonomy))
        if report["systems"]:
            rundir.write_bytes(f"{base}/f1_by_system.png", f1_chart(report["systems"], list(taxonomy.macro_codes)))
        if any(report["generator_training"].values()):
            rundir.write_bytes(f"{base}/generator_training.png", curves_chart(report["generator_training"]))
        self._summary = {"f1": {s: m["f1"] for s, m in report["systems"].items()},
                         "pairs": report["pairs"]["total"], "levels": report["levels"]["total"],
                         "report": f"{REPORT_DIR}/report.md"}
        if report["relabel"]:  # ids and figures only: the texts stay in the report files
            self._summary["drift"] = {s: {k: d[k] for k in ("total", "by_generator")}
                                      for s, d in report["relabel"]["drift"].items()}

    _summary: dict[str, Any] | None = None

    def summary(self, rundir) -> dict[str, Any] | None:
        return self._summary
