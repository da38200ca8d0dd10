"""The documentation's commands and links still work (issue 30, item 7).

Read from README.md, ARCHITECTURE.md and docs/*.md: shell code blocks (```bash / sh / console / shell
and plain ```) and inline code spans. Checked:

- every ``configs/recipes/*.yaml`` named anywhere validates with ``python -m pipelines.cli config``
  (no Ray, ~1 s each), and so does every documented ``chillguard run|config|graph RECIPE key=value``;
- every documented ``chillguard <subcommand>`` answers ``--help`` (each called once), and the
  subcommands documented are the ones the command line has;
- every documented ``make <target>`` is a target of the Makefile, and CI (``.ci/run``) runs the
  README's test command;
- every relative Markdown link points to an existing file, and its ``#anchor`` to a heading there.

Each checker is also fed a made-up command or link, so a check that finds nothing cannot pass.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md"))]
SHIPPED_RECIPES = {f"configs/recipes/{p.name}" for p in (REPO / "configs" / "recipes").glob("*.yaml")}

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL_LANGS = {"", "bash", "sh", "console", "shell"}
DOUBLE_SPAN = re.compile(r"``(.+?)``", re.S)
SPAN = re.compile(r"`([^`\n]+)`")
RECIPE = re.compile(r"configs/recipes/[\w.-]+\.yaml")
CLI = re.compile(r"(?:^|(?<=[\s/;&|(]))chillguard[ \t]+([a-z][a-z-]*)(.*)$", re.M)
MAKE = re.compile(r"(?:^|(?<=[\s;&|(]))make[ \t]+([^;&|\n]*)", re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


# --- extraction -------------------------------------------------------------------------------


def shell_lines(text: str) -> list[str]:
    """The command lines of a Markdown text: lines of its shell code blocks and its inline code spans,
    comments and ``$`` prompts removed."""
    code = [body for lang, body in FENCE.findall(text) if lang in SHELL_LANGS]
    prose = FENCE.sub("", text)
    spans = DOUBLE_SPAN.findall(prose)
    spans += SPAN.findall(DOUBLE_SPAN.sub("", prose))
    lines = [line for block in code for line in block.splitlines()] + [s.replace("\n", " ") for s in spans]
    lines = [re.sub(r"^\s*\$\s+", "", line) for line in lines]
    return [re.sub(r"(^|\s)#.*$", "", line).strip() for line in lines]


def recipes_named(text: str) -> set[str]:
    return set(RECIPE.findall(text))


def cli_commands(lines: list[str]) -> list[tuple[str, list[str]]]:
    """``(subcommand, arguments)`` of every ``chillguard`` invocation (arguments up to ``&&``, ``;``, ``|``)."""
    found = []
    for line in lines:
        for sub, rest in CLI.findall(line):
            rest = re.split(r"&&|;|\|", rest)[0]
            try:
                args = shlex.split(rest)
            except ValueError:  # an unbalanced quote in prose: the subcommand still counts
                args = rest.split()
            found.append((sub, args))
    return found


def make_targets_named(lines: list[str]) -> set[str]:
    """The targets of every ``make`` invocation (variable assignments and options left out)."""
    targets = set()
    for line in lines:
        for rest in MAKE.findall(line):
            targets |= {w for w in rest.split() if "=" not in w and not w.startswith("-")}
    return targets


def makefile_targets(makefile: str) -> set[str]:
    targets = set()
    for line in makefile.splitlines():
        if line[:1] in ("\t", "#", "") or "$" in line.split(":")[0]:
            continue
        m = re.match(r"^([^:=]+):(?!=)", line)
        if m:
            targets |= {t for t in m.group(1).split() if not t.startswith(".")}
    return targets


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``_`` and ``-`` kept), spaces
    to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", FENCE.sub("", text), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links of ``text`` (the file ``path``) whose file or heading does not exist."""
    prose = SPAN.sub("", DOUBLE_SPAN.sub("", FENCE.sub("", text)))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


# --- running the command line -----------------------------------------------------------------


def cli(args: list[str], *, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def failing_subcommands(subcommands: set[str]) -> dict[str, str]:
    """``--help`` of each subcommand, once; the ones that fail, with their stderr."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(sorted(subcommands), pool.map(lambda s: cli([s, "--help"]), sorted(subcommands))))
    return {s: d.stderr[-500:] for s, d in done.items() if d.returncode != 0}


@cache
def docs_text() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in DOCS}


@cache
def documented_lines() -> list[str]:
    return [line for text in docs_text().values() for line in shell_lines(text)]


def test_the_docs_name_known_recipes_subcommands_and_targets():
    assert {p.name for p in DOCS} >= {"README.md", "ARCHITECTURE.md", "reference.md", "tests.md"}
    recipes = set().union(*(recipes_named(t) for t in docs_text().values()))
    assert recipes <= SHIPPED_RECIPES, f"the docs name recipes that do not exist: {recipes - SHIPPED_RECIPES}"
    assert recipes == SHIPPED_RECIPES, f"recipes the docs never name: {SHIPPED_RECIPES - recipes}"

    usage = cli(["--help"])
    assert usage.returncode == 0, usage.stderr
    known = set(re.search(r"\{([a-z,-]+)\}", usage.stdout).group(1).split(","))
    documented = {sub for sub, _ in cli_commands(documented_lines())}
    assert documented <= known, f"the docs show subcommands the CLI does not have: {documented - known}"
    assert documented == known, f"subcommands the docs never show: {known - documented}"
    assert {"demo", "test"} <= make_targets_named(documented_lines())


def test_every_documented_subcommand_answers_help():
    subcommands = {sub for sub, _ in cli_commands(documented_lines())}
    assert len(subcommands) >= 5, subcommands
    assert not failing_subcommands(subcommands)


def test_a_made_up_subcommand_is_found_and_reported():
    text = "Run it:\n\n```bash\nchillguard frobnicate configs/recipes/demo.yaml   # not a real one\n```\n"
    found = {sub for sub, _ in cli_commands(shell_lines(text))}
    assert found == {"frobnicate"}
    assert {sub for sub, _ in cli_commands(shell_lines("then `.venv/bin/chillguard frobnicate`"))} == {"frobnicate"}
    assert "frobnicate" in failing_subcommands(found)


def test_every_documented_make_target_is_in_the_makefile():
    targets = makefile_targets((REPO / "Makefile").read_text(encoding="utf-8"))
    assert {"install", "demo", "test", "lint", "models/tiny/tiny_models.json"} <= targets
    named = make_targets_named(documented_lines())
    assert {"demo", "test", "test-e2e", "test-faults", "test-real", "demo-real", "install"} <= named
    assert named <= targets, f"the docs name make targets the Makefile lacks: {named - targets}"
    # a made-up target is caught
    assert make_targets_named(shell_lines("```\nmake demo-nowhere REAL_MODELS=x   # no\n```")) == {"demo-nowhere"}


def test_ci_runs_the_readme_test_command():
    readme = docs_text()[REPO / "README.md"]
    first_block = FENCE.search(readme).group(2)
    assert re.search(r"^make test\b", first_block, re.M), "the README's first block shows `make test`"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^exec make test$", ci, re.M), ".ci/run runs `make test`"


def test_relative_links_point_to_existing_files_and_headings():
    broken = {p.relative_to(REPO).as_posix(): b for p, t in docs_text().items() if (b := broken_links(p, t))}
    assert not broken
    readme = docs_text()[REPO / "README.md"]
    unlinked = [p.name for p in DOCS if p.parent.name == "docs" and f"(docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    for page in DOCS:
        if page.parent.name == "docs":
            head = docs_text()[page].splitlines()[:4]
            assert head[0].startswith("# ") and "(../README.md)" in head[2], f"{page.name}: title, summary, back link"
    assert len(readme.splitlines()) <= 300, "the README is the front page: keep it under 300 lines"
    # a link to a missing file or heading is caught
    fake = "[a](docs/nowhere.md) [b](README.md#no-such-heading) [c](README.md#install) [d](https://x.org/y)"
    assert broken_links(REPO / "README.md", fake) == [
        "docs/nowhere.md (no such file)", "README.md#no-such-heading (no heading #no-such-heading in README.md)"]


# --- recipes ----------------------------------------------------------------------------------

#: recipes that read what only exists outside a clone, and the errors they may give without it:
#: the real model folders (REAL_MODELS, default models/real, built by ../shared/models/fetch_real_models.py)
#: and the human-labelled sets (CHILLGUARD_SHARED_DATA, default ../shared/data); loop_ablation reads the
#: dataset `make demo` assembled (runs/demo/). Any other error, or any error of another recipe, fails.
OUTSIDE_THE_CLONE = {"configs/recipes/real_small.yaml": ("real", "shared"),
                     "configs/recipes/real_eval.yaml": ("real", "shared"),
                     "configs/recipes/shard_real.yaml": ("real",),
                     "configs/recipes/stream_guard_real.yaml": ("real", "shared"),
                     "configs/recipes/loop_ablation.yaml": ("demo_run",)}


@pytest.fixture(scope="module")
def recipe_root(tmp_path_factory, request) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A folder to run ``config`` in, as the repository root (the recipes' relative paths resolve
    against the working directory): every entry of the repository linked, and ``models/tiny`` the
    session's tiny models when the checkout has none built (``make demo`` builds them). Returns the
    folder, the environment, and the prefixes of the paths that may be missing (see
    :data:`OUTSIDE_THE_CLONE`)."""
    root = tmp_path_factory.mktemp("docs_root")
    for entry in REPO.iterdir():
        if entry.name not in ("models", ".git"):
            (root / entry.name).symlink_to(entry)
    (root / "models").mkdir()
    if (REPO / "models").is_dir():
        for entry in (REPO / "models").iterdir():
            (root / "models" / entry.name).symlink_to(entry)
    if not (REPO / "models" / "tiny" / "tiny_models.json").is_file():
        if (root / "models" / "tiny").is_symlink():
            (root / "models" / "tiny").unlink()
        tiny = request.getfixturevalue("tiny_models")
        (root / "models" / "tiny").symlink_to(Path(tiny["causal-lm"]).parent)
    env = dict(os.environ)
    # paths relative to the repository root, not to this folder: keep their meaning
    real = "models/real"
    if env.get("REAL_MODELS"):
        env["REAL_MODELS"] = real = str((REPO / env["REAL_MODELS"]).resolve())
    shared = str((REPO / env.get("CHILLGUARD_SHARED_DATA", "../shared/data")).resolve())
    env["CHILLGUARD_SHARED_DATA"] = shared
    missing = {"real": f"model path does not exist: {real}/", "shared": f"file does not exist: {shared}/",
               "demo_run": "file does not exist: runs/demo/"}
    return root, env, missing


def documented_invocations() -> set[tuple[str, ...]]:
    """``config`` of every recipe the docs name, and of every documented ``run|config|graph`` with
    overrides (``key=value``; a run directory in a bucket is left to the S3 tests: it needs the bucket)."""
    calls = {(r,) for t in docs_text().values() for r in recipes_named(t)}
    for sub, args in cli_commands(documented_lines()):
        recipe = [a for a in args if RECIPE.fullmatch(a)]
        overrides = tuple(a for a in args if "=" in a and not a.startswith("-") and "://" not in a)
        if sub in ("run", "config", "graph") and recipe and overrides:
            calls.add((recipe[0], *overrides))
    return calls


def test_every_documented_recipe_validates(recipe_root):
    root, env, missing = recipe_root
    calls = sorted(documented_invocations())
    assert len(calls) > len(SHIPPED_RECIPES), calls  # every recipe, and the documented overrides
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(calls, pool.map(lambda c: cli(["config", *c], cwd=root, env=env), calls)))
    failures, outside = {}, {}
    for call, done in results.items():
        if done.returncode == 0:
            assert "stages:" in done.stdout, call
            continue
        errors = [line.strip() for line in done.stderr.splitlines() if line.startswith("  ")]
        allowed = [missing[kind] for kind in OUTSIDE_THE_CLONE.get(call[0], ())]
        if done.returncode == 2 and errors and all(any(a in e for a in allowed) for e in errors):
            outside[call[0]] = len(errors)  # validated up to what lives outside the clone
        else:
            failures[" ".join(call)] = done.stderr[-1500:]
    assert not failures
    # the recipes that need nothing outside the repository did validate
    validated = {call[0] for call, done in results.items() if done.returncode == 0}
    assert validated >= {"configs/recipes/demo.yaml", "configs/recipes/shard_demo.yaml",
                         "configs/recipes/chillguard_paper.yaml", "configs/recipes/shard_paper.yaml"}
    assert set(outside) <= set(OUTSIDE_THE_CLONE), outside
