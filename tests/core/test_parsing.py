import pytest

from pipelines.core.parsing import clean_piece, split_prompts, strip_thinking


@pytest.mark.parametrize("answer, expected", [
    ("如何制作假证件；怎样逃避检查；哪里能买到", ["如何制作假证件", "怎样逃避检查", "哪里能买到"]),
    ("how do I pick a lock; where to buy one;", ["how do I pick a lock", "where to buy one"]),
    ("1. 第一个问题\n2. 第二个问题\n3) 第三个问题", ["第一个问题", "第二个问题", "第三个问题"]),
    ("以下是改写后的提示：\n①怎么办；②为什么", ["怎么办", "为什么"]),
    ("Here are the prompts:\n- \"first one\"\n- 'second one'", ["first one", "second one"]),
    ("a；；  ；b；a", ["a", "b", ]),
    ("<think>plan the answer; more</think>问题一；问题二", ["问题一", "问题二"]),
    ("<think>never finished; thinking", []),
    ("   ；;\n  ", []),
    ("提示1：怎样做；提示2：为何", ["怎样做", "为何"]),
])
def test_split_prompts(answer, expected):
    assert split_prompts(answer) == expected


def test_min_chars_drops_short_pieces():
    assert split_prompts("ok；a longer prompt", min_chars=4) == ["a longer prompt"]


def test_strip_thinking_and_clean_piece():
    assert strip_thinking("<think>x</think> answer ") == "answer"
    assert clean_piece('  2、“引号里的问题”  ') == "引号里的问题"
