"""Human audit, part 1: a stratified sample of the jury's rows as Label Studio tasks.

``chillguard audit export RUN_DIR --stage jury --n 300`` reads the stage's rows with their final label
(the adjudicator's where the run has an adjudicate stage over them) and votes, draws a sample stratified
by vote pattern × micro category (:func:`allocate`, :func:`draw`), and writes

- ``tasks.json``: Label Studio's import format, a JSON list of tasks ``{"data": {...}, "predictions":
  [...]}``; ``data`` holds the text, our row id (``row_id``: Label Studio numbers tasks itself), the
  final label, micro code, vote pattern and votes; the final label and micro code are a pre-annotation
  (``predictions``) the annotator confirms or corrects;
- ``label_config.xml``: the project's labelling config (safe / unsafe, and the micro code of the
  taxonomy when unsafe);
- ``RUN_DIR/audit/sample.json``: which rows were exported (the import accounts for every one of them).

Pure functions (patterns, allocation, draw, tasks, config) are unit-tested; :func:`export_audit` is the
command's I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from pipelines.core.rows import OK, UNSAFE
from pipelines.core.rundir import NotARunDir, RunDir
from pipelines.core.taxonomy import Taxonomy, load_taxonomy
from pipelines.labelling.voting import LABELS, decide, strict_majority

#: where the audit lives in a run directory (the sample's record, the report)
AUDIT_DIR = "audit"
SAMPLE_RECORD = f"{AUDIT_DIR}/sample.json"
#: the vote patterns, in report order
UNANIMOUS, MAJORITY_PATTERN, TIE, QUORUM_MISSED = "unanimous", "majority", "tie", "quorum_missed"
PATTERNS = (UNANIMOUS, MAJORITY_PATTERN, TIE, QUORUM_MISSED)
#: the labelling config's control names: what a Label Studio result's ``from_name`` says
LABEL_CONTROL, MICRO_CONTROL, TEXT_OBJECT = "label", "micro", "text"
#: the pre-annotation's ``model_version`` in Label Studio
MODEL_VERSION = "chillguard-jury"
DEFAULT_FLOOR = 5


class AuditError(ValueError):
    """A one-line problem with an audit's inputs (the command prints it and exits 2)."""


def vote_pattern(verdicts: Sequence[str | None], *, judges: int, min_valid_votes: int) -> str:
    """How the jury reached (or missed) a row's label, from the votes it asked (``None``/``""``: an
    abstention or a failed request) of its ``judges``, under :func:`~pipelines.labelling.voting.decide`'s
    rule (judges the cascade did not ask count as abstentions there: they could not change its label):

    - ``unanimous``: a label, and every vote asked is valid and gives it (4–0; 3–0 when the cascade
      stopped after three);
    - ``majority``: a label by strict majority with a dissent or an abstention (3–1, 2–1 + abstention);
    - ``tie``: enough valid votes, split evenly (2–2): the adjudicator decided;
    - ``quorum_missed``: fewer valid votes than ``min_valid_votes`` (2–0 with two abstentions, none).
    """
    asked = [v or None for v in verdicts]
    outcome = decide(asked + [None] * max(judges - len(asked), 0), min_valid_votes=min_valid_votes)
    if outcome.below_quorum:
        return QUORUM_MISSED
    if outcome.tie:
        return TIE
    return UNANIMOUS if all(v == outcome.label for v in asked) else MAJORITY_PATTERN


def allocate(sizes: dict[Any, int], n: int, floor: int = DEFAULT_FLOOR) -> dict[Any, int]:
    """Rows to draw per stratum: proportional, with a floor per non-empty stratum.

    With stratum sizes ``N_h`` (``N = Σ N_h``): every stratum first gets ``b_h = min(N_h, floor)``;
    the ``R = n − Σ b_h`` rows left are shared in proportion to what each stratum has left,
    ``q_h = R · (N_h − b_h) / (N − Σ b_h)``, each getting ``⌊q_h⌋`` and the largest remainders one more
    (ties by stratum key), so ``a_h = b_h + ⌊q_h⌋ (+1)``, ``a_h ≤ N_h`` and ``Σ a_h = n``. ``n ≥ N``
    takes every row. The floor wins over ``n``: with more strata than ``n / floor`` the sample has
    ``Σ b_h > n`` rows (small strata are what an audit must not miss)."""
    if n < 0 or floor < 0:
        raise ValueError(f"n and floor must be >= 0, got n={n}, floor={floor}")
    sizes = {k: v for k, v in sizes.items() if v > 0}
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    base = {k: min(v, floor) for k, v in sizes.items()}
    left, room = n - sum(base.values()), total - sum(base.values())
    if left <= 0 or room == 0:
        return base
    quotas = {k: left * (sizes[k] - base[k]) / room for k in sizes}
    out = {k: base[k] + math.floor(q) for k, q in quotas.items()}
    short = n - sum(out.values())
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - math.floor(quotas[k])), str(k)))[:short]:
        out[k] += 1
    return out


def rank(seed: int, row_id: str) -> str:
    """A row's place in its stratum's draw: a seeded hash of its id (independent of row order)."""
    return hashlib.sha256(f"{seed}\x00{row_id}".encode()).hexdigest()


def draw(rows: Sequence[dict], n: int, *, seed: int, floor: int = DEFAULT_FLOOR) -> list[dict]:
    """The stratified sample of ``rows`` (each with ``id``, ``pattern``, ``micro``): per stratum
    (pattern × micro, ``-`` for none) the :func:`allocate`-d number of rows with the lowest
    :func:`rank`; sorted by stratum and rank. The same rows and seed give the same sample."""
    strata: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        strata[stratum(row)].append(row)
    counts = allocate({k: len(v) for k, v in strata.items()}, n, floor)
    return [row for key in sorted(strata)
            for row in sorted(strata[key], key=lambda r: rank(seed, r["id"]))[:counts.get(key, 0)]]


def stratum(row: dict) -> tuple[str, str]:
    return row["pattern"], row["micro"] or "-"


# ------------------------------------------------------------------------------------------------
# Label Studio: tasks and the labelling config


def task(row: dict) -> dict[str, Any]:
    """One Label Studio import task: the row in ``data`` (votes as a list and as one line to show),
    the final label and micro code as a prediction (a pre-annotation), scored by the share of valid
    votes that gave the label."""
    votes = [{"judge": v["judge"], "verdict": v["verdict"] or ""} for v in row["votes"]]
    data = {"text": row["text"], "row_id": row["id"], "jury_label": row["label"], "micro": row["micro"] or "",
            "pattern": row["pattern"], "decision": row["decision"], "votes": votes,
            "votes_text": "; ".join(f"{v['judge']}: {v['verdict'] or 'abstained'}" for v in votes)}
    result = []
    if row["label"] in LABELS:
        result.append(_choice(LABEL_CONTROL, row["label"]))
        if row["label"] == UNSAFE and row["micro"]:
            result.append(_choice(MICRO_CONTROL, row["micro"]))
    valid = [v["verdict"] for v in votes if v["verdict"] in LABELS]
    score = round(valid.count(row["label"]) / len(valid), 4) if valid and row["label"] in LABELS else 0.0
    return {"data": data, "predictions": [{"model_version": MODEL_VERSION, "score": score, "result": result}]
            if result else []}


def _choice(control: str, value: str) -> dict[str, Any]:
    return {"from_name": control, "to_name": TEXT_OBJECT, "type": "choices", "value": {"choices": [value]}}


def label_config(taxonomy: Taxonomy) -> str:
    """The project's labelling config: the text, the jury's votes, safe / unsafe (required), and the
    micro code (shown once unsafe is chosen; a hint gives each code's names)."""
    micros = "\n".join(f"    <Choice value={quoteattr(m.code)} hint={quoteattr(f'{m.zh} / {m.en}')}/>"
                       for macro in taxonomy.macros for m in macro.micros)
    return f"""<View>
  <Text name="{TEXT_OBJECT}" value="$text"/>
  <Header value="Jury votes (final label: $jury_label $micro, $pattern)" size="6"/>
  <Text name="votes" value="$votes_text"/>
  <Choices name="{LABEL_CONTROL}" toName="{TEXT_OBJECT}" choice="single-radio" required="true" showInline="true">
    <Choice value="safe" hint="安全"/>
    <Choice value="unsafe" hint="不安全"/>
  </Choices>
  <Choices name="{MICRO_CONTROL}" toName="{TEXT_OBJECT}" choice="single-radio" visibleWhen="choice-selected"
           whenTagName="{LABEL_CONTROL}" whenChoiceValue="unsafe">
{micros}
  </Choices>
</View>
"""


# ------------------------------------------------------------------------------------------------
# The run's rows


@dataclass(frozen=True)
class JuryRules:
    judges: list[str]
    quorum: int


def check_stage(rundir: RunDir, stage: str) -> None:
    """A one-line :class:`AuditError` unless ``stage`` finished in the run and its rows carry votes."""
    try:
        rundir.check_is_run_dir()
    except NotARunDir as exc:
        raise AuditError(str(exc)) from None
    if rundir.read_manifest(stage) is None:
        finished = sorted(k for k, m in rundir.manifests().items() if m)
        raise AuditError(f"{rundir.root} has no finished stage {stage!r} (finished: {', '.join(finished) or 'none'})")
    schema = rundir.output_schema(stage)
    if schema is None or "votes" not in schema.names:
        raise AuditError(f"stage {stage!r} of {rundir.root} has no jury votes: audit the jury or adjudicate stage")


def jury_rules(rundir: RunDir, stage: str) -> JuryRules:
    """The judges and the quorum the votes were counted under (the jury's manifest)."""
    manifests = {stage: rundir.read_manifest(stage) or {}, "jury": rundir.read_manifest("jury") or {}}
    for manifest in manifests.values():
        config = (manifest.get("config") or {}).get("config") or {}
        if config.get("judges"):
            quorum = config.get("min_valid_votes") or strict_majority(len(config["judges"]))
            return JuryRules(list(config["judges"]), quorum)
    quorum = (manifests[stage].get("config") or {}).get("min_valid_votes")
    return JuryRules([], quorum or 0)


def final_labels_stage(rundir: RunDir, stage: str) -> str | None:
    """The stage holding the final labels of ``stage``'s rows: itself when its rows carry the
    adjudicator's fields, else a finished stage that reads it and does (the adjudicate stage)."""
    schema = rundir.output_schema(stage)
    if schema is not None and "adjudicator" in schema.names:
        return stage
    for name, manifest in sorted(rundir.manifests().items()):
        after = rundir.output_schema(name) if manifest and stage in manifest.get("inputs", []) else None
        if after is not None and "adjudicator" in after.names:
            return name
    return None


def audit_rows(rundir: RunDir, stage: str) -> list[dict]:
    """``stage``'s ok rows with their final label, micro code, decision and vote pattern."""
    rules = jury_rules(rundir, stage)
    final_stage = final_labels_stage(rundir, stage)
    final = {}
    if final_stage and final_stage != stage:
        for batch in rundir.iter_batches(final_stage, OK, ["id", "label", "micro", "decision"]):
            final.update({r["id"]: r for r in batch.to_pylist()})
    rows = []
    for batch in rundir.iter_batches(stage, OK, ["id", "text", "label", "micro", "votes", "decision"]):
        for row in batch.to_pylist():
            row.update({k: v for k, v in final.get(row["id"], {}).items() if k != "id"})
            verdicts = [v["verdict"] or None for v in row["votes"]]
            judges = max(len(rules.judges), len(verdicts), 1)
            row["pattern"] = vote_pattern(verdicts, judges=judges,
                                          min_valid_votes=min(rules.quorum or strict_majority(judges), judges))
            rows.append(row)
    return rows


def export_audit(run_dir: str, *, stage: str, n: int, seed: int, floor: int = DEFAULT_FLOOR,
                 out: str | None = None, taxonomy_path: str | None = None) -> dict[str, Any]:
    """Write the sample's tasks and labelling config (``out``, default ``RUN_DIR/audit``) and its
    record in the run directory; return the record."""
    rundir = RunDir(run_dir, create=False)
    check_stage(rundir, stage)
    rows = audit_rows(rundir, stage)
    if not rows:
        raise AuditError(f"stage {stage!r} of {run_dir} has no ok rows to audit")
    sample = draw(rows, n, seed=seed, floor=floor)
    taxonomy = load_taxonomy(taxonomy_path) if taxonomy_path else load_taxonomy()
    folder = Path(out) if out else None
    tasks = json.dumps([task(r) for r in sample], ensure_ascii=False, indent=1)
    strata: dict[str, dict[str, int]] = defaultdict(lambda: {"rows": 0, "sampled": 0})
    for row in rows:
        strata["/".join(stratum(row))]["rows"] += 1
    for row in sample:
        strata["/".join(stratum(row))]["sampled"] += 1
    record = {"stage": stage, "final_labels_from": final_labels_stage(rundir, stage) or stage, "n": n,
              "seed": seed, "floor": floor, "rows": len(rows), "sampled": len(sample),
              "strata": dict(sorted(strata.items())),
              "ids": [r["id"] for r in sample]}
    if folder is None:
        rundir.write_text(f"{AUDIT_DIR}/tasks.json", tasks)
        rundir.write_text(f"{AUDIT_DIR}/label_config.xml", label_config(taxonomy))
        record["files"] = [rundir.uri(AUDIT_DIR, "tasks.json"), rundir.uri(AUDIT_DIR, "label_config.xml")]
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tasks.json").write_text(tasks, encoding="utf-8")
        (folder / "label_config.xml").write_text(label_config(taxonomy), encoding="utf-8")
        record["files"] = [str(folder / "tasks.json"), str(folder / "label_config.xml")]
    rundir.write_text(SAMPLE_RECORD, json.dumps(record, indent=2, ensure_ascii=False))
    return record
