"""Benchmark figures that must not flatter: when a steady-state rate can be read off production
timestamps (pure; no engine is started)."""

from __future__ import annotations

import pytest

from benchmarks.report import SteadyRule, steady_rate


def _stream(batches: int, rows_per_batch: int, every_s: float, start_s: float = 0.0) -> list[float]:
    return [start_s + b * every_s for b in range(batches) for _ in range(rows_per_batch)]


def test_steady_stream_gives_its_rate():
    done = _stream(batches=625, rows_per_batch=64, every_s=0.5, start_s=50.0)  # 40,000 rows
    result = steady_rate(done, [32] * len(done), warm=1000, start=0.0)
    # the warm-th row is in batch 15: the window runs from it to batch 624, 64 x 32 tokens per 0.5 s
    assert result["why_na"] is None
    assert result["tok_per_s"] == pytest.approx(64 * 32 / 0.5)
    assert result["batches"] == 609 and result["steady_rows"] == 609 * 64
    assert result["bins_with_rows"] == 10 and result["window_share"] == pytest.approx(304.5 / 362)


def test_one_burst_has_no_steady_rate():
    # the warm-up trickles in, then the other 4,000 rows reach the stamp at one instant
    done = _stream(batches=16, rows_per_batch=64, every_s=1.0, start_s=50.0)[:1000] + [70.0] * 4000
    result = steady_rate(done, [32] * 5000, warm=1000, start=0.0)
    assert result["tok_per_s"] is None
    assert "1 distinct times" in result["why_na"] and "bursts" in result["why_na"]


def test_a_few_bursts_have_no_steady_rate():
    # 40 batches, but all crowd into two moments of the window
    done = [10.0 + i * 0.01 for i in range(1000)] + [20.0 + b * 0.001 for b in range(20) for _ in range(100)] \
        + [40.0 + b * 0.001 for b in range(20) for _ in range(100)]
    result = steady_rate(done, [8] * len(done), warm=1000, start=0.0)
    assert result["tok_per_s"] is None
    assert "2 of 10 equal time slices" in result["why_na"]


def test_a_late_drain_of_many_batches_has_no_steady_rate():
    # seen with stock ray.data.llm at 40,000 prompts on 2 CPUs: nothing for 227 s, then 200 batches
    # evenly over 5 s. Batches and time slices look like a stream; the window is 2% of the run.
    done = _stream(batches=200, rows_per_batch=200, every_s=0.025, start_s=227.0)
    result = steady_rate(done, [32] * len(done), warm=1000, start=0.0)
    assert result["batches"] == 195 and result["bins_with_rows"] == 10
    assert result["tok_per_s"] is None
    assert "steady window is 2% of the run" in result["why_na"] and "draining" in result["why_na"]


def test_short_steady_window_after_a_long_warm_up_has_no_rate():
    # a steady stream, but the part after warm-up is a small share of it: the backlog drains fast
    slow = _stream(batches=100, rows_per_batch=10, every_s=1.0)               # 1,000 rows in 99 s
    fast = _stream(batches=100, rows_per_batch=20, every_s=0.1, start_s=99.1)  # 2,000 rows in 10 s
    result = steady_rate(slow + fast, [1] * 3000, warm=1000, start=0.0)
    assert result["tok_per_s"] is None
    assert "steady window is 9% of the run" in result["why_na"]


def test_too_few_rows_after_warm_up():
    done = _stream(batches=30, rows_per_batch=40, every_s=1.0)
    result = steady_rate(done, [1] * len(done), warm=1000, start=0.0)
    assert result["tok_per_s"] is None and "200 rows produced after the 1000th (the warm-up)" in result["why_na"]
    # the same stream is measurable under a looser rule (the rule is the only thing that decides)
    loose = SteadyRule(min_rows=100, min_batches=5, min_bins_share=0.5, min_window_share=0.1)
    assert steady_rate(done, [1] * len(done), warm=1000, start=0.0, rule=loose)["tok_per_s"] == pytest.approx(40.0)
    assert "0 rows produced after the 5000th" in steady_rate(done, [1] * len(done), 5000, start=0.0)["why_na"]


def test_unsorted_input_is_sorted_and_bad_input_named():
    done = _stream(batches=200, rows_per_batch=10, every_s=1.0)
    forward = steady_rate(done, list(range(2000)), warm=100, start=0.0)
    backward = steady_rate(done[::-1], list(range(2000))[::-1], warm=100, start=0.0)
    assert forward["tok_per_s"] == backward["tok_per_s"] is not None
    with pytest.raises(ValueError, match="2000 times but 3 token counts"):
        steady_rate(done, [1, 2, 3], warm=100, start=0.0)
    with pytest.raises(ValueError, match="warm must be >= 1"):
        steady_rate(done, [1] * 2000, warm=0, start=0.0)
    with pytest.raises(ValueError, match="before the start"):
        steady_rate(done, [1] * 2000, warm=100, start=5.0)


def test_serve_benchmark_reports_no_rate_for_too_few_answers():
    from benchmarks.serve import MIN_ANSWERS, summarize

    few = summarize({"answered": MIN_ANSWERS - 1, "failed": {}, "wall_s": 1.0, "partial": True,
                     "latencies": [0.1] * (MIN_ANSWERS - 1)})
    assert few["rps"] is None and "answers" in few["why_na"]
    enough = summarize({"answered": 100, "failed": {503: 2}, "wall_s": 4.0, "partial": False,
                        "latencies": [i / 1000 for i in range(1, 101)]})
    assert enough["rps"] == 25.0 and enough["p50_ms"] == pytest.approx(50.5)
    assert enough["p99_ms"] == pytest.approx(99.01)
