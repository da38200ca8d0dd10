"""House rules that a reviewer would otherwise have to remember (pure; reads the source tree only)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: a module past this many lines mixes concerns: split it by concern (issue 28)
MAX_MODULE_LINES = 700


def test_no_product_module_is_over_the_line_ceiling():
    sizes = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
             for room in ("pipelines", "actors", "cluster") for p in (REPO / room).rglob("*.py")}
    assert len(sizes) > 50   # the rooms were found
    over = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: split each by concern: {over}"
