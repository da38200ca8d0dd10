"""An LLM stage's answer figures: counted per batch in the workers, merged per role by the runner."""

import pytest

from pipelines.core.answers import (
    answer_language,
    answer_quality_line,
    batch_answer_stats,
    merge_answer_stats,
    read_answer_stats,
    write_batch_stats,
)


@pytest.mark.parametrize("text, lang", [
    ("这个问题涉及违法内容。", "zh"), ("不安全 unsafe", "zh"), ("The prompt is safe.", "en"),
    ("safe", "en"), ("1234 !!", "other"), ("", "other"), ("Привет мир", "other"),
    ("Here is the 翻译 of it", "en"),
])
def test_answer_language(text, lang):
    assert answer_language(text) == lang


def test_a_batch_counts_failures_empties_refusals_languages_and_lengths():
    stats = batch_answer_stats(
        ["安全", "<think>hmm</think>", "抱歉，我无法回答这个问题。", "unsafe\nA6", "", "x"],
        ["", "", "", "", "", "timeout"], [10, 11, 12, 13, 14, 15], [1, 5, 9, 3, 0, 0])
    assert stats == {"requests": 6, "failed": 1, "empty": 2, "refusals": 1,
                     "languages": {"zh": 2, "en": 1}, "chars": [2, 13, 9], "prompt_tokens": 75, "output_tokens": 18}


def test_batches_merge_per_role_with_shares_and_the_median(tmp_path):
    folder = str(tmp_path / "answers")
    write_batch_stats(folder, "judge1", batch_answer_stats(["安全", "不安全"], ["", ""], [20, 30], [1, 2]))
    write_batch_stats(folder, "judge1", batch_answer_stats(["unsafe", ""], ["", "boom"]))
    write_batch_stats(folder, "judge2", batch_answer_stats([""], [""]))
    merged = read_answer_stats(folder)
    assert merged == {
        "judge1": {"requests": 4, "failed": 1, "empty": 0, "refusals": 0, "prompt_tokens": 50, "output_tokens": 3,
                   "languages": {"en": pytest.approx(1 / 3, abs=1e-4), "zh": pytest.approx(2 / 3, abs=1e-4)},
                   "median_chars": 3},
        "judge2": {"requests": 1, "failed": 0, "empty": 1, "refusals": 0, "prompt_tokens": 0, "output_tokens": 0,
                   "languages": {}, "median_chars": None}}
    assert merge_answer_stats([]) == {}
    assert read_answer_stats(str(tmp_path / "none")) is None
    assert answer_quality_line("judge1", merged["judge1"]) == \
        "judge1: 4 requests, 1 failed, 0 empty, 0 refused, zh 67%, en 33%, median 3 chars"
    assert answer_quality_line("judge2", merged["judge2"]).endswith("no answers, median n/a chars")
