"""SHARD's statistics and tables (``pipelines/shard/stats.py``, ``shard_eval.py``): win / tie / loss, the Wilson
interval (by hand and from statsmodels), the one- and two-sided binomial test against SciPy, McNemar between
systems, the evaluation metrics from hand-made outcomes, and the report naming each p-value's test."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from scipy import stats as sp

from pipelines.core.rows import ERROR, OK, make_row
from pipelines.core.statistics import MCNEMAR_CHI2, MCNEMAR_EXACT
from pipelines.shard.pairwise import CRITERIA, A
from pipelines.shard.shard_eval import compare_systems, evaluation_metrics, finish_prompt, report_markdown
from pipelines.shard.stats import BINOMIAL_TEST, LOSS, TIE, WIN, win_tie_loss


def _wilson_by_hand(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The textbook Wilson score interval (Wilson 1927), to check which interval the library gives."""
    z = sp.norm.ppf(0.5 + confidence / 2)
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z / d * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_win_rate_interval_is_wilson_by_hand_and_the_library():
    # 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10) = 0.7091, half 0.2188 -> [0.4902, 0.9433]
    s = win_tie_loss([WIN] * 8 + [TIE] * 3 + [LOSS] * 2)
    assert s["win_rate_ci"] == pytest.approx([0.4902, 0.9433], abs=1e-4)
    for k, n, confidence in [(0, 5, 0.95), (5, 5, 0.95), (3, 17, 0.9), (120, 200, 0.99)]:
        ci = win_tie_loss([WIN] * k + [LOSS] * (n - k), confidence)["win_rate_ci"]
        assert ci == pytest.approx(list(_wilson_by_hand(k, n, confidence)), abs=1e-12)
        library = sp.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
        assert ci == pytest.approx([library.low, library.high], abs=1e-12)   # statsmodels' Wilson = SciPy's


@pytest.mark.parametrize("k,n", [(7, 10), (0, 10), (10, 10), (5, 10), (3, 20), (60, 100), (500, 1000)])
def test_binomial_p_is_one_sided_by_default_two_sided_as_an_option(k, n):
    s = win_tie_loss([WIN] * k + [LOSS] * (n - k))
    # SHARD's test (significance_tests.py): H1 wins > 0.5, p = P(X >= k), X ~ Binomial(n, 0.5)
    assert s["binomial_p"] == sp.binomtest(k, n, 0.5, alternative="greater").pvalue
    assert s["binomial_p"] == pytest.approx(sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n, rel=1e-9)
    assert s["binomial_test"] == BINOMIAL_TEST == "exact binomial vs 0.5, one-sided (wins > 0.5)"
    two = win_tie_loss([WIN] * k + [LOSS] * (n - k), alternative="two-sided")
    assert two["binomial_p"] == sp.binomtest(k, n, 0.5).pvalue
    # for p = 0.5 the two-sided exact p-value is min(1, 2 · P(X <= min(k, n − k)))
    by_hand = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n)
    assert two["binomial_p"] == pytest.approx(by_hand, rel=1e-9)
    assert two["binomial_test"] == "exact binomial vs 0.5, two-sided"
    if 2 * k > n:  # more wins than losses: the two-sided p-value is twice the one-sided one
        assert two["binomial_p"] == pytest.approx(min(1.0, 2 * s["binomial_p"]), rel=1e-9)
    with pytest.raises(ValueError, match="binomial alternative"):
        win_tie_loss([WIN], alternative="less")


def test_win_tie_loss_summary():
    outcomes = [WIN] * 7 + [TIE] * 5 + [LOSS] * 3
    s = win_tie_loss(outcomes)
    assert (s["n"], s["win"], s["tie"], s["loss"], s["decisive"]) == (15, 7, 5, 3, 10)
    assert s["win_rate"] == pytest.approx(0.7) and s["shares"]["tie"] == pytest.approx(1 / 3)
    # 7 of 10 at 0.5: P(X >= 7) = (120 + 45 + 10 + 1) / 1024 = 176/1024 one-sided, two-sided 352/1024
    assert s["binomial_p"] == pytest.approx(176 / 1024) and s["binomial_test"] == BINOMIAL_TEST
    assert win_tie_loss(outcomes, alternative="two-sided")["binomial_p"] == pytest.approx(352 / 1024)
    json.dumps(s)   # plain numbers: metrics.json takes them as they are
    empty = win_tie_loss([TIE, TIE])
    assert empty["win_rate"] is None and empty["win_rate_ci"] is None and empty["binomial_p"] is None
    with pytest.raises(ValueError, match="outcomes must be"):
        win_tie_loss([WIN, "draw"])


def _eval_row(i: int, outcomes: dict[str, tuple[str, str]]) -> dict:
    return {"id": f"p{i}", "dataset": "dna" if i % 2 else "linguasafe",
            "results": [{"system": s, "model": f"m-{s}", "answer": "a", "helpfulness": h, "harmfulness": x,
                         "judgements": []} for s, (h, x) in outcomes.items()]}


def _hand_made_rows() -> list[dict]:
    """40 prompts, (self, teacher) outcomes per criterion chosen so that every count is known:
    helpfulness: 4 both win, 6 only self wins (b), 1 only teacher wins (c), 29 neither;
    harmfulness: 20 only self wins (b), 8 only teacher wins (c), 12 neither (28 discordant: chi-square)."""
    helpfulness = [(WIN, WIN)] * 4 + [(WIN, TIE)] * 6 + [(LOSS, WIN)] * 1 + [(TIE, LOSS)] * 3 + [(TIE, TIE)] * 26
    harmfulness = [(WIN, LOSS)] * 20 + [(TIE, WIN)] * 8 + [(TIE, TIE)] * 12
    return [_eval_row(i, {"self": (h[0], x[0]), "teacher": (h[1], x[1])})
            for i, (h, x) in enumerate(zip(helpfulness, harmfulness))]


def _report_metrics(metrics: dict) -> dict:
    return {"settings": {"systems": {"self": {"model": "m"}, "teacher": {"model": "t"}},
                         "baseline_model": "base", "judge_model": "j", "order_seed": 42, "split": "test",
                         "confidence": 0.95},
            "rows": {"in": 42, "evaluated": 40, "errored": 1, "dropped": 1},
            "reasons": {"errored": {"unparseable_verdict": 1}, "dropped": {"other_split": 1}}, **metrics}


def test_evaluation_metrics_from_hand_made_outcomes():
    metrics = evaluation_metrics(_hand_made_rows(), ["self", "teacher"], 0.95)
    assert json.loads(json.dumps(metrics)) == metrics            # metrics.json holds it as it is
    self_help = metrics["systems"]["self"]["helpfulness"]
    assert (self_help["win"], self_help["tie"], self_help["loss"]) == (10, 29, 1)
    assert self_help["binomial_p"] == pytest.approx(12 / 2 ** 11)    # 10 of 11, one-sided: (11 + 1) / 2¹¹
    two = evaluation_metrics(_hand_made_rows(), ["self", "teacher"], 0.95, "two-sided")
    assert two["systems"]["self"]["helpfulness"]["binomial_p"] == pytest.approx(2 * 12 / 2 ** 11)
    assert self_help["binomial_test"] == BINOMIAL_TEST
    assert set(self_help["by_dataset"]) == {"dna", "linguasafe"}
    assert sum(d["n"] for d in self_help["by_dataset"].values()) == 40
    help_cmp, harm_cmp = metrics["comparisons"]
    assert (help_cmp["first"], help_cmp["second"], help_cmp["criterion"]) == ("self", "teacher", "helpfulness")
    assert help_cmp["mcnemar"] == {"n": 40, "first_wins": 10, "second_wins": 5, "b": 6, "c": 1,
                                   "test": MCNEMAR_EXACT, "statistic": 1.0, "p_value": pytest.approx(16 / 128)}
    assert harm_cmp["mcnemar"] == {"n": 40, "first_wins": 20, "second_wins": 8, "b": 20, "c": 8,
                                   "test": MCNEMAR_CHI2, "statistic": pytest.approx(121 / 28),
                                   "p_value": pytest.approx(math.erfc(math.sqrt(121 / 56)))}
    # the unpaired two-proportion z-test is gone: the systems answer the same prompts
    assert set(help_cmp) == {"first", "second", "criterion", "mcnemar"}
    assert compare_systems([{"harmfulness": WIN}], [{"harmfulness": TIE}], "harmfulness")["mcnemar"]["b"] == 1


def test_report_names_the_test_next_to_each_p_value():
    from pipelines.shard.shard_eval import outcomes_chart

    metrics = _report_metrics(evaluation_metrics(_hand_made_rows(), ["self", "teacher"], 0.95))
    report = report_markdown(metrics)
    assert ("| system | n | win | tie | loss | win rate | Wilson 95% CI | p (exact binomial vs 0.5, one-sided "
            "(wins > 0.5)) |") in report
    assert f"| self | 40 | 10 | 29 | 1 | 0.909 | {_ci_text(10, 11)} | 0.0059 |" in report   # 12 / 2¹¹
    assert "| first | second | criterion | prompts | first wins | second wins | b | c | test | p |" in report
    assert "| self | teacher | helpfulness | 40 | 10 | 5 | 6 | 1 | McNemar exact | 0.1250 |" in report
    p = math.erfc(math.sqrt(121 / 56))
    assert f"| self | teacher | harmfulness | 40 | 20 | 8 | 20 | 8 | McNemar chi2 cc | {p:.4f} |" in report
    assert "| self | 40 | 20 | 20 | 0 | 1.000 | [0.839, 1.000] | < 0.0001 |" in report   # 2 / 2²⁰
    assert "z-test" not in report and "two-proportion" not in report
    assert outcomes_chart(metrics).startswith(b"\x89PNG")
    single = report_markdown(_report_metrics(evaluation_metrics(_hand_made_rows(), ["self"], 0.95)))
    assert "## Between systems" not in single


def _ci_text(k: int, n: int) -> str:
    low, high = _wilson_by_hand(k, n)
    return f"[{low:.3f}, {high:.3f}]"


def test_finish_prompt_pairs_systems_or_names_the_failure():
    base = {**make_row(id="p0", text="q"), "dataset": "dna", "split": "test", "baseline": "o1"}
    judged = [{**base, "system": "self", "system_model": "m", "system_answer": "ans", "criterion": c,
               "position": A, "raw": "[[A]]", "verdict": A, "outcome": WIN, "judge_error": "", "judge_reason": ""}
              for c in CRITERIA]
    failed = {**base, "system": "teacher", "system_model": "t", "system_answer": "", "status": ERROR,
              "reason": "prompt_too_long", "detail": "too long", "criterion": "", "position": "", "raw": "",
              "verdict": "", "outcome": "", "judge_error": "", "judge_reason": ""}
    ok = finish_prompt(pa.Table.from_pylist(judged), systems=["self"], judge_model="j").to_pylist()[0]
    assert ok["status"] == OK and ok["results"][0]["helpfulness"] == WIN and ok["judge_model"] == "j"
    bad = finish_prompt(pa.Table.from_pylist(judged + [failed]), systems=["self", "teacher"], judge_model="j")
    row = bad.to_pylist()[0]
    assert (row["status"], row["reason"]) == (ERROR, "prompt_too_long") and row["detail"].startswith("teacher:")
    assert [r["system"] for r in row["results"]] == ["self", "teacher"]

