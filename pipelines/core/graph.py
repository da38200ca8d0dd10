"""The run order: a topological order of the graph of declared inputs, and the graph's drawings.

Each stage declares what it depends on (:attr:`pipelines.core.stage.Stage.inputs`, the stages whose ok
rows it reads, and :attr:`~pipelines.core.stage.Stage.requires`, the stages it needs otherwise: an
index, a trained model); the runner runs a stage after every stage it names. :func:`run_order` is the
one place that order is decided; :func:`graph_text`, :func:`graph_dot` and :func:`write_graph_png`
draw the graph for ``chillguard config --graph`` and ``chillguard graph``. Pure but the PNG (which
imports matplotlib when called).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol


class GraphError(ValueError):
    """A graph that has no run order, told in one line: names depended on that are no node of it
    (``dangling``: name -> the missing names it depends on) or a cycle (``cycle``: ``[a, b, a]``)."""

    def __init__(self, message: str, *, dangling: Mapping[str, list[str]] | None = None,
                 cycle: list[str] | None = None):
        super().__init__(message)
        self.dangling = dict(dangling or {})
        self.cycle = list(cycle or [])


def cycle_text(cycle: Sequence[str]) -> str:
    """``a -> b -> a`` (each feeds the next), or ``a -> a`` for a name that depends on itself."""
    return " -> ".join(cycle)


class Node(Protocol):
    """What the drawings read of a stage."""

    name: str
    inputs: tuple[str, ...]
    requires: tuple[str, ...]


def run_order(upstream: Mapping[str, Iterable[str]]) -> list[str]:
    """The names of ``upstream`` (``name -> the names it depends on``) in an order where each comes
    after everything it depends on.

    Stable tie-break: among the names that are ready at the same time (all they depend on placed),
    the one first in ``upstream``'s own order goes first (Kahn's algorithm with a priority queue on
    that position). So an order that already satisfies every dependency comes back unchanged, and
    otherwise a name moves only as far down as its dependencies push it. ``build_stages`` passes the
    stages in the order they are built - the recipe's sections in the order the recipe lists them
    under ``stages:``, each section's stages in the order its factory returns them - so that order
    decides between independent stages, and the graph decides the rest.

    Raises :class:`GraphError` (one line) for a name that is not a key of ``upstream`` (naming the
    names that depend on it) and for a cycle (naming one: ``a -> b -> a``, each name feeding the next).
    """
    position = {name: i for i, name in enumerate(upstream)}
    deps = {name: list(dict.fromkeys(ups)) for name, ups in upstream.items()}
    dangling = {name: [u for u in ups if u not in position] for name, ups in deps.items()}
    dangling = {name: missing for name, missing in dangling.items() if missing}
    if dangling:
        raise GraphError("; ".join(f"{name} depends on {', '.join(missing)}, "
                                   f"{'which is not' if len(missing) == 1 else 'which are not'} in the graph"
                                   for name, missing in dangling.items()), dangling=dangling)
    waiting = {name: len(ups) for name, ups in deps.items()}
    downstream: dict[str, list[str]] = {name: [] for name in deps}
    for name, ups in deps.items():
        for up in ups:
            downstream[up].append(name)
    ready = [position[name] for name, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    names = list(upstream)
    order: list[str] = []
    while ready:
        name = names[heapq.heappop(ready)]
        order.append(name)
        for down in downstream[name]:
            waiting[down] -= 1
            if waiting[down] == 0:
                heapq.heappush(ready, position[down])
    if len(order) < len(names):
        cycle = find_cycle({name: deps[name] for name in names if waiting[name] > 0})
        raise GraphError(f"a cycle: {cycle_text(cycle)}", cycle=cycle)
    return order


def find_cycle(blocked: Mapping[str, Sequence[str]]) -> list[str]:
    """One cycle among ``blocked`` (``name -> what it depends on``, every name waiting on another of
    them), written in run direction and closed: ``[a, b, a]`` when ``b`` depends on ``a``."""
    name = next(iter(blocked))
    path: list[str] = []
    seen: dict[str, int] = {}
    while name not in seen:
        seen[name] = len(path)
        path.append(name)
        name = next(up for up in blocked[name] if up in blocked)  # the first that waits too
    cycle = path[seen[name]:] + [name]
    return cycle[::-1]  # walked upstream; told downstream


def depths(order: Sequence[str], upstream: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """Topological depth of each name of ``order`` (a :func:`run_order`): 0 for a name that depends on
    nothing, else one more than the deepest name it depends on."""
    depth: dict[str, int] = {}
    for name in order:
        depth[name] = 1 + max((depth[u] for u in upstream[name]), default=-1)
    return depth


def graph_text(stages: Sequence[Node]) -> str:
    """The stages (in run order) one a line, each with what it reads (``<-``) and requires."""
    width = max((len(s.name) for s in stages), default=0)
    lines = []
    for i, s in enumerate(stages, 1):
        parts = ([f"<- {', '.join(s.inputs)}"] if s.inputs else []) + (
            [f"requires {', '.join(s.requires)}"] if s.requires else [])
        lines.append(f"{i:3d}  {s.name:<{width}}  {'  '.join(parts)}".rstrip())
    return "\n".join(lines) + "\n"


def graph_dot(stages: Sequence[Node], title: str = "stages") -> str:
    """Graphviz DOT of the stages: an edge from each input (solid) and each requirement (dashed)."""
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {quoted(title)} {{", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];']
    lines += [f"  {quoted(s.name)};" for s in stages]
    for s in stages:
        lines += [f"  {quoted(up)} -> {quoted(s.name)};" for up in s.inputs]
        lines += [f"  {quoted(up)} -> {quoted(s.name)} [style=dashed];" for up in s.requires if up not in s.inputs]
    return "\n".join([*lines, "}"]) + "\n"


def write_graph_png(stages: Sequence[Node], path: str | Path, title: str = "stages") -> Path:
    """Draw the stages as a layered graph, one row per topological depth (run order within a row),
    inputs as solid arrows and requirements dashed; write it to ``path`` as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    upstream = {s.name: [*s.inputs, *s.requires] for s in stages}
    depth = depths([s.name for s in stages], upstream)
    rows: dict[int, list[str]] = {}
    for s in stages:
        rows.setdefault(depth[s.name], []).append(s.name)
    widest = max((len(r) for r in rows.values()), default=1)
    label = max((len(s.name) for s in stages), default=8)
    box_w = max(1.6, 0.11 * label + 0.3)  # inches per box, room for the longest name
    where: dict[str, tuple[float, float]] = {}
    for d, names in rows.items():
        for i, name in enumerate(names):
            where[name] = ((i - (len(names) - 1) / 2) * box_w, -d)
    fig, ax = plt.subplots(figsize=(max(4.0, widest * box_w + 1), max(2.0, 0.7 * len(rows) + 1)))
    try:
        for s in stages:
            x, y = where[s.name]
            for up, style in [*((u, "-") for u in s.inputs), *((u, "--") for u in s.requires)]:
                ux, uy = where[up]
                bend = 0.0 if y - uy == -1 else 0.25 if ux <= x else -0.25  # long edges bow round rows
                ax.annotate("", xy=(x, y + 0.18), xytext=(ux, uy - 0.18),
                            arrowprops={"arrowstyle": "->", "linestyle": style, "color": "#777777", "lw": 0.8,
                                        "connectionstyle": f"arc3,rad={bend}", "shrinkA": 0, "shrinkB": 0})
        for name, (x, y) in where.items():
            ax.text(x, y, name, ha="center", va="center", fontsize=8,
                    bbox={"boxstyle": "round,pad=0.3", "facecolor": "#e8f0fe", "edgecolor": "#4a6fa5"})
        xs = [x for x, _ in where.values()] or [0.0]
        ax.set_xlim(min(xs) - box_w / 2 - 0.2, max(xs) + box_w / 2 + 0.2)
        ax.set_ylim(-max(rows, default=0) - 0.6, 0.6)
        ax.set_title(title)
        ax.axis("off")
        path = Path(path)
        fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def order_nodes(nodes: Sequence[Any]) -> list[Any]:
    """``nodes`` (objects with ``name``, ``inputs`` and ``requires``: stages) in :func:`run_order`, the
    given order breaking ties. Raises :class:`GraphError` as it does, and for a name given twice."""
    by_name: dict[str, Any] = {}
    for node in nodes:
        if node.name in by_name:
            raise GraphError(f"two stages are named {node.name}")
        by_name[node.name] = node
    return [by_name[name] for name in run_order({n.name: [*n.inputs, *n.requires] for n in nodes})]


def upstream_closure(nodes: Sequence[Any], targets: Iterable[str]) -> list[Any]:
    """``nodes`` (in their order) that ``targets`` depend on, directly or through other nodes, and the
    targets themselves: what must run to produce the targets. A target that is no node raises
    :class:`GraphError` naming it and the closest node names."""
    import difflib

    by_name = {n.name: n for n in nodes}
    wanted: set[str] = set()
    todo = list(targets)
    for name in todo:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            raise GraphError(f"no stage is named {name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            node = by_name[name]
            todo.extend(u for u in (*node.inputs, *node.requires) if u in by_name)
    return [n for n in nodes if n.name in wanted]
