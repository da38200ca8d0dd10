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


#: what validating a recipe must not import: each costs 0.2-7 s to import here (issue 30)
HEAVY_FOR_CONFIG = ("torch", "vllm", "transformers", "fastapi", "ray.serve", "ray.data", "sklearn", "deepspeed")


def test_validating_a_recipe_imports_no_engine_trainer_server_or_scikit_learn():
    """`chillguard config` loads the recipe model of every stage: it must start in about a second."""
    import subprocess
    import sys

    probe = ("import sys; from pipelines.cli import main; main(['config', 'configs/recipes/demo.yaml']); "
             f"print('HEAVY', sorted(m for m in {HEAVY_FOR_CONFIG!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("HEAVY ")]
    assert line == "HEAVY []", line
