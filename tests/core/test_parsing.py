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
    # a numbered list is split at its lines: the items' own semicolons are text (the shape of
    # Qwen2.5-Coder-1.5B's rewrites of ToxiCN posts; the text is written here)
    ("1. 今天下雨了；出门记得带伞。\n2. 这部电影很长；但是值得一看。",
     ["今天下雨了；出门记得带伞。", "这部电影很长；但是值得一看。"]),
    ("以下是改写：\n1. 甲；乙\n2. 丙", ["甲；乙", "丙"]),
    ("1. 只有一行；还有分号", ["只有一行", "还有分号"]),          # one item is no list: semicolons split
])
def test_split_prompts(answer, expected):
    assert split_prompts(answer) == expected


def test_min_chars_drops_short_pieces():
    assert split_prompts("ok；a longer prompt", min_chars=4) == ["a longer prompt"]


def test_strip_thinking_and_clean_piece():
    assert strip_thinking("<think>x</think> answer ") == "answer"
    assert clean_piece('  2、“引号里的问题”  ') == "引号里的问题"


@pytest.mark.parametrize("piece, expected", [
    # quotes and numbers that belong to the text stay (issue 28: these were corrupted)
    ("“躺平”是什么意思？", "“躺平”是什么意思？"),
    ("3.5倍的剂量会怎样…", "3.5倍的剂量会怎样…"),
    ("10:30开会前怎么准备", "10:30开会前怎么准备"),
    ("-3度的天气穿什么", "-3度的天气穿什么"),
    ("“A”和“B”哪个好", "“A”和“B”哪个好"),
    ("'quoted' word first", "'quoted' word first"),
    # list markers at the start, and quotes that wrap the whole piece, go
    ("1. 如何开锁", "如何开锁"), ("1.如何开锁", "如何开锁"), ("2) how to", "how to"),
    ("- 第一个", "第一个"), ("• 第二个", "第二个"), ("（3）第三个", "第三个"), ("4、第四个", "第四个"),
    ('5. "What is this?"', "What is this?"), ("「整句都在引号里」", "整句都在引号里"),
    ("1. 3.5倍是多少", "3.5倍是多少"),
])
def test_clean_piece_strips_only_markers_and_wrapping_quotes(piece, expected):
    assert clean_piece(piece) == expected


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think> answer ", "answer"),
    # a template that opened <think> in the prompt: the answer has only the closing tag
    ("reasoning about 安全 and 不安全\n</think>\n\n不安全", "不安全"),
    ("first</think>second</think> final", "final"),
    ("<think>never closed", ""),
    ("plain answer", "plain answer"),
])
def test_strip_thinking_cases(text, expected):
    assert strip_thinking(text) == expected
