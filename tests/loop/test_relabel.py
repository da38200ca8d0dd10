"""Issue 31, item 2: relabelled rewrites (``stages.loop.relabel: jury``). The drift formula by hand, the
recipe checks and the stages it builds, and the relabel path on a real local Ray: scripted judges
(no engine) label G0's candidates, ``loop2_pairs`` takes y* from them, and the loop report compares
the pairs and levels with the seed-label version of the same candidates."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.config import ConfigError
from pipelines.core.rows import DROPPED, ERROR, OK, make_row, to_table
from pipelines.core.rundir import RunDir
from pipelines.core.stage import Stage, run_stages
from pipelines.core.taxonomy import DEFAULT_TAXONOMY
from pipelines.loop.drift import label_drift
from tests.conftest import assert_balanced
from tests.loop.test_loop_units import LOOP

JURY = """
  jury: {{inputs: [seeds_real], judges: [j1, j2, j3], mode: sequential}}
"""
JUDGES = "".join(f'  {j}: {{engine: http, model: tiny, url: "http://127.0.0.1:1/v1/chat/completions"}}\n'
                 for j in ("j1", "j2", "j3"))


def _recipe(tmp_path, tiny_models, *, jury: bool = True, adjudicate: bool = False, relabel: str = "jury"):
    from pipelines.construction import load_recipe

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"text": "x", "label": "safe"}\n')
    text = LOOP.format(run=tmp_path / "run", model=tiny_models["causal-lm"], seeds=seeds)
    text = text.replace("stages:\n", JUDGES + "stages:\n" + (JURY.format()[1:] if jury else ""))
    text += f"    relabel: {relabel}\n"
    if adjudicate:
        text = text.replace("stages:\n", "stages:\n  adjudicate: {model: j1}\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path)


# --- the drift formula -----------------------------------------------------------------------------


def test_label_drift_by_hand():
    rows = [  # (id, seed label, jury label, micro, generator)
        ("a", "unsafe", "safe", "D5", "G0"), ("b", "unsafe", "unsafe", "D5", "G0"), ("c", "unsafe", "", "D5", "G0"),
        ("d", "safe", "unsafe", "", "G0"), ("e", "unsafe", "safe", "D5", "G1"), ("f", "unsafe", "safe", "A1", "G1"),
        ("g", "safe", "safe", "", "G1")]
    drift = label_drift([dict(zip(("id", "seed_label", "jury_label", "micro", "generator"), r)) for r in rows],
                        examples=2)
    # all: 7 candidates, 6 jury-labelled (c has none), changed a, d, e, f: 4 / 6
    assert drift["total"] == {"candidates": 7, "labelled": 6, "unlabelled": 1, "changed": 4, "share": 4 / 6,
                              "unsafe_to_safe": 3, "safe_to_unsafe": 1, "examples": ["a", "d"]}
    g0, g1 = drift["by_generator"]["G0"], drift["by_generator"]["G1"]
    assert (g0["labelled"], g0["changed"], g0["share"]) == (3, 2, 2 / 3)      # a, b, d; a and d changed
    assert (g1["labelled"], g1["changed"], g1["share"], g1["examples"]) == (3, 2, 2 / 3, ["e", "f"])
    assert {m: (g["labelled"], g["changed"]) for m, g in drift["by_micro"].items()} == \
        {"-": (2, 1), "A1": (1, 1), "D5": (3, 2)}
    only_unlabelled = label_drift([{"id": "c", "seed_label": "unsafe", "jury_label": "", "micro": "D5",
                                    "generator": "G0"}])
    assert only_unlabelled["total"]["share"] is None and only_unlabelled["total"]["unlabelled"] == 1


# --- the recipe ------------------------------------------------------------------------------------


def test_relabel_without_a_jury_section_is_one_line_config_error(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="relabel: jury .* has no stages.jury section") as exc:
        _recipe(tmp_path, tiny_models, jury=False)
    header, problem = str(exc.value).strip().splitlines()  # "invalid recipe <file>:" and one line for it
    assert header.startswith("invalid recipe") and "set relabel: off" in problem
    with pytest.raises(ConfigError, match="stages.loop.relabel"):
        _recipe(tmp_path, tiny_models, relabel="judges")


def test_relabel_stages_in_the_graph_and_hashes_unchanged_when_off(tmp_path, tiny_models):
    from pipelines.construction import build_stages

    on = {s.name: s for s in build_stages(_recipe(tmp_path, tiny_models))}  # the column contracts are checked here
    names = list(on)
    assert names.index("loop1_decontaminate") < names.index("loop1_relabel") < names.index("loop2_pairs")
    assert names.index("loop2_decontaminate") < names.index("loop2_relabel")
    assert on["loop1_relabel"].inputs == ("loop1_decontaminate",)
    assert on["loop1_relabel"].config.judges == ["j1", "j2", "j3"] and on["jury"].inputs == ("seeds_real",)
    assert on["loop2_pairs"].requires == ("loop2_score", "loop2_label", "loop1_relabel")
    assert {"loop1_relabel", "loop2_relabel"} <= set(on["loop_report"].requires)
    assert on["loop_report"].drift_stages == ["loop1_relabel", "loop2_relabel"]
    assert on["loop1_train_c1"].inputs == ("seeds_real", "loop1_decontaminate")  # C1 still reads D_gen(1)

    adjudicated = {s.name: s for s in build_stages(_recipe(tmp_path, tiny_models, adjudicate=True))}
    assert adjudicated["loop1_relabel_adjudicate"].inputs == ("loop1_relabel",)
    assert adjudicated["loop2_pairs"].relabelled == "loop1_relabel_adjudicate"

    off = {s.name: s for s in build_stages(_recipe(tmp_path, tiny_models, relabel="off"))}
    assert not any("relabel" in name for name in off)
    # relabel off: the pairs stage's payload is the one it had before relabelling existed
    assert {"relabelled", "threshold"}.isdisjoint(off["loop2_pairs"].hash_payload())
    assert off["loop2_pairs"].config_hash() != on["loop2_pairs"].config_hash()
    assert off["loop2_pairs"].requires == ("loop2_score", "loop2_label")
    # the loop's other stages do not change with relabel (their hashes: the same)
    assert {n: s.config_hash() for n, s in off.items() if n != "loop2_pairs"} == \
        {n: s.config_hash() for n, s in on.items() if n in off and n != "loop2_pairs"}


# --- the relabel path on a real local Ray ------------------------------------------------------------


class Rows(Stage):
    """A finished upstream stage standing in for the loop's (its rows given, partitioned by status)."""

    unhashed = Stage.unhashed | {"table"}

    def __init__(self, name: str, table: pa.Table):
        super().__init__(name=name)
        self.table = table

    def expected_rows_in(self) -> int:
        return self.table.num_rows

    def build(self, inputs):
        import ray

        return ray.data.from_arrow(self.table)


#: per candidate: (seed, seed label, micro, C1's prediction, quality, the three judges' verdicts)
CANDIDATES = {
    "a1": ("s1", "unsafe", "D5", "safe", 4, ("safe", "safe", "safe")),       # seed: L1; jury safe: L4
    "a2": ("s1", "unsafe", "D5", "unsafe", 4, ("unsafe", "unsafe", "unsafe")),  # L4 both
    "a3": ("s1", "unsafe", "D5", "safe", 5, ("safe", "unsafe", "")),         # seed: L1; jury 1-1: no label
    "a4": ("s1", "unsafe", "D5", "unsafe", 2, ("unsafe", "unsafe", "unsafe")),  # L3 both
    "b1": ("s2", "safe", "", "safe", 4, ("safe", "safe", "safe")),           # L4 both
    "b2": ("s2", "safe", "", "safe", 4, ("unsafe", "unsafe", "unsafe")),     # seed: L4; jury unsafe: L1
}


def _upstream() -> list[Stage]:
    from pipelines.loop.levels import level_of

    seeds = to_table([{**make_row(id="s1", text="种子一", label="unsafe", macro="D", micro="D5"), "split": "train"},
                      {**make_row(id="s2", text="种子二", label="safe"), "split": "train"}], {"split": pa.string()})
    rows = [make_row(id=c, parent_id=s, text=f"候选 {c}", label=y, micro=m, macro=m[:1], source="gen", iteration=1)
            for c, (s, y, m, *_rest) in CANDIDATES.items()]
    lineage = {"generator": pa.string(), "split": pa.string()}
    candidates = to_table([{**r, "generator": "G0", "split": "train"} for r in rows], lineage)
    labelled = to_table([{**r, "pred_label": CANDIDATES[r["id"]][3]} for r in rows], {"pred_label": pa.string()})
    scored = to_table([{**r, "pred_label": p, "quality": q, "level": level_of(r["label"], p, q)}
                       for r, (_, _, _, p, q, _) in zip(rows, CANDIDATES.values())],
                      {"pred_label": pa.string(), "quality": pa.int32(), "level": pa.string()})
    return [Rows("seeds_real", seeds), Rows("loop1_decontaminate", candidates), Rows("loop2_label", labelled),
            Rows("loop2_score", scored)]


@pytest.mark.slow
def test_relabelled_pairs_take_y_star_from_the_jury(tmp_path, tiny_models, ray_local, monkeypatch):
    from pipelines.construction import build_stages
    from pipelines.core.taxonomy import load_taxonomy
    from pipelines.labelling.jury import JuryStage
    from pipelines.loop.report import LoopReportStage, markdown

    def scripted_vote(self, dataset, index, judge):
        def vote(batch):
            verdicts = [CANDIDATES[i][5][index] for i in batch.column("id").to_pylist()]
            return (batch.append_column(f"_raw_{index}", pa.array([v or "不知道" for v in verdicts], pa.string()))
                    .append_column(f"_err_{index}", pa.array([""] * len(verdicts), pa.string())))

        return dataset.map_batches(vote, batch_format="pyarrow")

    monkeypatch.setattr(JuryStage, "_vote", scripted_vote)
    built = {s.name: s for s in build_stages(_recipe(tmp_path, tiny_models))}
    rundir = RunDir(str(tmp_path / "run"))
    manifests = run_stages([*_upstream(), built["loop1_relabel"], built["loop2_pairs"]], rundir)
    for name in ("loop1_relabel", "loop2_pairs"):
        assert_balanced(manifests[name], rundir)

    # the jury's labels; a3's 1-1 (one abstention) is no majority, and there is no adjudicator
    jury = {r["id"]: (r["source_label"], r["label"])
            for r in pq.read_table(rundir.partition_uri("loop1_relabel", OK)).to_pylist()}
    assert jury == {"a1": ("unsafe", "safe"), "a2": ("unsafe", "unsafe"), "a3": ("unsafe", ""),
                    "a4": ("unsafe", "unsafe"), "b1": ("safe", "safe"), "b2": ("safe", "unsafe")}
    drift = manifests["loop1_relabel"]["summary"]["drift"]
    assert drift["total"] == {"candidates": 6, "labelled": 5, "unlabelled": 1, "changed": 2, "share": 2 / 5,
                              "unsafe_to_safe": 1, "safe_to_unsafe": 1, "examples": ["a1", "b2"]}
    assert drift["by_generator"]["G0"]["share"] == 2 / 5
    assert (drift["by_micro"]["D5"]["share"], drift["by_micro"]["-"]["share"]) == (1 / 3, 1 / 2)
    assert "候选" not in json.dumps(manifests["loop1_relabel"]["summary"], ensure_ascii=False)  # ids, no texts

    # y* from the jury: s2's rewrite b2 turned unsafe fools C1 (L1) and pairs with b1; s1 loses its
    # seed-label pair (a1 is now right, a3 has no label)
    pairs = pq.read_table(rundir.partition_uri("loop2_pairs", OK)).to_pylist()
    assert [(p["parent_id"], p["chosen_id"], p["rejected_id"], p["pair_type"]) for p in pairs] == \
        [("s2", "b2", "b1", "<L1,L4>")]
    dropped = pq.read_table(rundir.partition_uri("loop2_pairs", DROPPED)).to_pylist()
    assert [(r["parent_id"], r["reason"]) for r in dropped] == [("s1", "no_valid_pair")]
    accounting = manifests["loop2_pairs"]["summary"]["accounting"]
    assert accounting["ineligible"] == {"no_jury_label:no_majority": 1}
    assert accounting["candidates"] == 6 == accounting["paired"] + sum(accounting["unpaired"].values()) + 1
    assert accounting["levels"] == {"L1": 1, "L3": 1, "L4": 3, "ineligible": 1}
    assert accounting["pair_types"] == {"<L1,L4>": 1}
    seed_label = accounting["seed_label"]
    assert seed_label["levels"] == {"L1": 2, "L3": 1, "L4": 3} and seed_label["pair_types"] == {"<L1,L4>": 1}
    assert seed_label["candidates"] == 6 == seed_label["paired"] + sum(seed_label["unpaired"].values())

    report = LoopReportStage(["loop1_relabel", "loop2_pairs"], systems=[], taxonomy_path=str(DEFAULT_TAXONOMY),
                             drift_stages=["loop1_relabel"]).report(rundir)
    assert report["relabel"]["comparison"] == accounting
    assert report["relabel"]["drift"]["loop1_relabel"]["texts"]["b2"] == \
        {"text": "候选 b2", "seed_label": "safe", "jury_label": "unsafe"}
    text = markdown(report, load_taxonomy(DEFAULT_TAXONOMY))
    assert "| jury's label (used) | 1 | 0 | 1 | 3 | 1 | 1 | 1 | 0 | 0 |" in text
    assert "| seed's label | 2 | 0 | 1 | 3 | 0 | 1 | 1 | 0 | 0 |" in text
    assert "| all | 6 | 5 | 2 | 0.400 | 1 | 1 | a1, b2 |" in text and "`b2` safe → unsafe: 候选 b2" in text


def test_a_candidate_without_a_jury_row_or_with_an_adjudication_error_is_ineligible_with_its_reason():
    """Pure (no Ray): the markers of an adjudicated relabelling, one error row, one candidate absent."""
    from pipelines.loop.pairs import candidate_markers, jury_markers, seed_markers, seed_pairs
    from tests.loop.test_loop_accounting import PROMPT, _candidate

    seeds = to_table([{**make_row(id="s1", text="种子", label="unsafe", micro="D5"), "split": "train"}],
                     {"split": pa.string()})
    scored = to_table([{**_candidate(c, "s1"), "level": "L1", "pred_label": "safe", "quality": 4} for c in "xyz"],
                      {"quality": pa.int32(), "pred_label": pa.string(), "level": pa.string()})
    jury_ok = to_table([{**_candidate("x", "s1"), "label": "unsafe"}])
    jury_error = to_table([{**_candidate("y", "s1"), "label": "", "status": ERROR,
                            "reason": "adjudicator_unparseable"}])
    group = pa.concat_tables([seed_markers(seeds), candidate_markers(scored), jury_markers(jury_ok, status=OK),
                              jury_markers(jury_error, status=ERROR)])
    (row,) = seed_pairs(group, seed=0, max_pairs=1, split="train", iteration=2, prompt=PROMPT, relabel=True,
                        threshold=3).to_pylist()
    accounting = json.loads(row["accounting"])
    assert row["status"] == DROPPED and row["reason"] == "no_valid_pair"  # x alone is eligible (L1)
    assert accounting["ineligible"] == {"no_jury_label:adjudicator_unparseable": 1,
                                        "no_jury_label:not_relabelled": 1}
    assert accounting["levels"] == {"L1": 1, "ineligible": 2} and accounting["seed_label"]["levels"] == {"L1": 3}
