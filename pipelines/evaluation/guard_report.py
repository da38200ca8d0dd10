"""The report of a guard evaluation stage (:mod:`pipelines.evaluation.guard_eval`), written under its
``report/`` folder: ``report.md`` (:func:`report_markdown`: settings, row counts, overall P/R/F1,
confusion, per macro, per micro, micro category, answers, reasons), per-category F1 charts
(:func:`f1_chart`) and, for guards that answer with our micro codes, the micro-category confusion
heatmap (:func:`micro_confusion_chart`); :mod:`pipelines.evaluation.metrics` has the formulas.
"""

from __future__ import annotations

from pipelines.core.reports import fmt, png_bytes
from pipelines.core.rows import SAFE, UNSAFE
from pipelines.core.taxonomy import Taxonomy
from pipelines.evaluation.metrics import WRONG_CLASSES


def report_markdown(metrics: dict, taxonomy: Taxonomy) -> str:
    """``report.md``: settings, row counts, overall P/R/F1, confusion, per macro, per micro, micro
    category, answers, reasons."""
    s, o = metrics["settings"], metrics["overall"]
    counts = metrics["rows"]
    # no answer tokens without a score (score: false, or an adapter that is not scored)
    unsafe_tokens, safe_tokens = (" ".join(f"`{t}`" for t in (s["answer_tokens"] or {}).get(w, []))
                                  for w in (UNSAFE, SAFE))
    decision = (f"`P(unsafe) >= {s['threshold']}`, P(unsafe) = p({unsafe_tokens}) / "
                f"(p({unsafe_tokens}) + p({safe_tokens})) over the first tokens of every spelling of the "
                "two answer words at the first answer position, where the top log-probabilities "
                f"hold either ({metrics['scores']['rows_with_score']} of {counts['answered']} answered rows), "
                "else the answer's label"
                if s["score"] else "the answer's label")
    lines = [
        f"# Guard evaluation: {s['stage']}", "",
        f"- guard: `{s['adapter']}`, model `{s['model']}`, {s['level']}-level",
        f"- rows: {counts['in']} read from {', '.join(s['inputs'])}"
        + (f" (split `{s['split']}` where the input has a split column)" if s["split"] else "")
        + f"; evaluated {counts['evaluated']} (answered {counts['answered']}, unparsed {counts['unparsed']}), "
        f"not evaluated {counts['input_errors']} (input errors), dropped {counts['dropped']}",
        "- every evaluated row is scored: an unparsed row (an answer the adapter cannot read, or a failed "
        "request) counts as the opposite of its gold label (a miss on gold unsafe, a false alarm on gold safe)",
        f"- prediction: {decision}",
        "- F1 with `unsafe` as the positive class, `2TP / (2TP + FP + FN)`; per micro category on the rows "
        "whose gold micro is that category (both labels); per macro category the mean F1 of its micro "
        "categories with a defined F1; `n/a` = undefined (no gold and no predicted unsafe row)",
        "",
        "## Overall", "",
        "| rows | unparsed | precision | recall | F1 | accuracy |", "|---|---|---|---|---|---|",
        f"| {o['rows']} | {metrics['unparsed']} | {fmt(o['precision'])} | {fmt(o['recall'])} | {fmt(o['f1'])} | "
        f"{fmt(o['accuracy'])} |",
        "",
        "## Confusion", "",
        "| gold \\ predicted | unsafe | safe |", "|---|---|---|",
        f"| unsafe | {o['tp']} (TP) | {o['fn']} (FN) |",
        f"| safe | {o['fp']} (FP) | {o['tn']} (TN) |",
        "",
        "## Per macro category", "",
        "| macro | name | F1 | micro categories with F1 | rows |", "|---|---|---|---|---|",
    ]
    for code, m in metrics["per_macro"].items():
        lines.append(f"| {code} | {taxonomy.macro(code).zh} / {taxonomy.macro(code).en} | {fmt(m['f1'])} | "
                     f"{m['categories_with_f1']} / {m['categories']} | {m['rows']} |")
    lines += ["", "## Per micro category", "",
              "| micro | name | rows | gold unsafe | TP | FP | FN | TN | precision | recall | F1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for code, m in metrics["per_micro"].items():
        lines.append(f"| {code} | {taxonomy.micro(code).zh} | {m['rows']} | {m['gold_unsafe']} | {m['tp']} | "
                     f"{m['fp']} | {m['fn']} | {m['tn']} | {fmt(m['precision'])} | {fmt(m['recall'])} | "
                     f"{fmt(m['f1'])} |")
    lines += ["", f"Rows whose gold micro is not a taxonomy code (overall only): {metrics['untagged_rows']}.", ""]
    lines += _micro_category_markdown(metrics["micro_category"], s["adapter"], taxonomy)
    if metrics["answers"]:
        lines += ["## Answers", "", "| the guard's verdict | rows |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in metrics["answers"].items()), ""]
    for kind, title in (("unparsed", "Rows unparsed (scored as wrong)"),
                        ("input_errors", "Rows not evaluated (input errors)"), ("dropped", "Rows dropped")):
        if metrics["reasons"][kind]:
            lines += [f"## {title}", "", *(f"- {r}: {n}" for r, n in metrics["reasons"][kind].items()), ""]
    lines += ["## Charts", "", "![per-micro F1](per_micro_f1.png)", "", "![per-macro F1](per_macro_f1.png)", ""]
    return "\n".join(lines)


def _micro_category_markdown(category: dict | None, adapter: str, taxonomy: Taxonomy) -> list[str]:
    lines = ["## Micro category", ""]
    if category is None:
        return lines + [f"Not scored: adapter `{adapter}` does not answer with our taxonomy's micro codes.", ""]
    lines += [
        "Does the guard name the right micro category? On the gold-unsafe rows whose gold micro is a taxonomy "
        "code; the predicted class is the micro code of an `unsafe` prediction, or `safe` (predicted safe), "
        "`no_code` (unsafe without a taxonomy code) or `unparsed` (no usable answer), the last three always "
        "wrong. Accuracy = correct / rows; macro F1 = the mean over the gold codes present of the per-code "
        "F1 (one-vs-rest).", "",
        "| rows | correct | accuracy | macro F1 | gold-unsafe rows without a code (not scored here) |",
        "|---|---|---|---|---|",
        f"| {category['rows']} | {category['correct']} | {fmt(category['accuracy'])} | "
        f"{fmt(category['macro_f1'])} | {category['untagged_unsafe_rows']} |", ""]
    if category["per_code"]:
        lines += ["| micro | name | gold rows | category F1 |", "|---|---|---|---|",
                  *(f"| {code} | {taxonomy.micro(code).zh} | {m['rows']} | {fmt(m['f1'])} |"
                    for code, m in category["per_code"].items()), ""]
    return lines + (["![micro-category confusion](micro_confusion.png)", ""] if category["rows"] else [])


def micro_confusion_chart(confusion: dict, title: str) -> bytes:
    """A PNG heatmap of the micro-category confusion: gold micro code (rows) × predicted class
    (columns: the codes, then ``safe``, ``no_code``, ``unparsed``), counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.array(confusion["counts"], dtype=float).reshape(len(confusion["gold"]), len(confusion["predicted"]))
    rows, cols = counts.shape
    fig, ax = plt.subplots(figsize=(0.32 * cols + 2.5, 0.3 * rows + 2.0), dpi=110)
    image = ax.imshow(np.ma.masked_equal(counts, 0), cmap="Blues", aspect="auto", vmin=0)
    for i, j in zip(*np.nonzero(counts)):
        ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=6,
                color="white" if counts[i, j] > 0.6 * counts.max() else "black")
    ax.axvline(cols - len(WRONG_CLASSES) - 0.5, color="grey", linewidth=0.8)  # codes | always-wrong classes
    ax.set_xticks(range(cols), confusion["predicted"], rotation=90, fontsize=7)
    ax.set_yticks(range(rows), confusion["gold"], fontsize=7)
    ax.set_xlabel("predicted (gold-unsafe rows)")
    ax.set_ylabel("gold micro")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="rows")
    fig.tight_layout()
    return png_bytes(fig)


def f1_chart(values: dict[str, float | None], groups: dict[str, str], title: str,
             ylabel: str = "F1 (unsafe positive)") -> bytes:
    """A PNG bar chart of F1 per category: bars coloured by ``groups[category]`` (the macro
    category), the value above each bar, ``n/a`` where F1 is undefined."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names = list(values)
    palette = plt.get_cmap("tab10")
    colour = {g: palette(i % 10) for i, g in enumerate(dict.fromkeys(groups[n] for n in names))}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.34 * len(names) + 2.5), 3.8), dpi=110)
    ax.bar(range(len(names)), [values[n] or 0.0 for n in names], color=[colour[groups[n]] for n in names])
    for i, n in enumerate(names):
        label = "n/a" if values[n] is None else f"{values[n]:.2f}"
        ax.text(i, (values[n] or 0.0) + 0.02, label, ha="center", va="bottom", rotation=90, fontsize=7,
                color="grey" if values[n] is None else "black")
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 12 else 0, fontsize=8)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(colour) < len(names):  # groups differ from the bars: say which colour is which
        ax.legend(handles=[Patch(color=c, label=g) for g, c in colour.items()], fontsize=7, ncol=len(colour),
                  loc="upper right", frameon=False)
    fig.tight_layout()
    return png_bytes(fig)
