"""Column contracts: the columns each stage reads from the stages upstream and the columns its ``ok``
rows have, checked over every edge of a recipe before Ray starts (``build_stages``).

A stage declares (:class:`pipelines.core.stage.Stage`):

- ``reads``: the columns it cannot do without, one set for every one of its ``inputs`` or a map
  ``{upstream stage: columns}`` (which may name a stage of its ``requires`` whose rows it reads: a
  scored set, a keyword pool). A column it only uses when present is not declared;
- ``writes``: the columns of its ``ok`` rows. :data:`PASSTHROUGH` in it stands for the columns that
  every one of its inputs has (a filter, a labeller, an evaluation keeps its input's columns and adds
  its own): language identification's ``writes = PASSTHROUGH | {LINEAGE, "lang"}``. Stages that write
  the common schema say so with :data:`pipelines.core.rows.COMMON_COLUMNS`.

A column is a name a downstream stage finds in a row: as a Parquet column, or - where a stage merges
its inputs into the common schema (:func:`pipelines.core.rows.to_common_schema`) - in the row's JSON
``lineage``, where :func:`pipelines.core.rows.column_or_lineage` looks it up. So a column passed through
such a stage is still there (a seed set's ``response`` after preprocessing), and a column that an
ingest mapping does not fill (``columns.response`` unset) is not written at all, although the Parquet
schema has an empty column of that name. The check does not tell the two places apart: a stage that
selects a column by name (MDPO's pair columns, adjudication's ``votes``) needs a stage upstream that
writes it as a column (MDPO checks its inputs' schema again when it runs).

:func:`check_columns` is pure: stages in run order in, their output columns out, or a
:class:`ColumnError` naming the first edge (in run order) where a stage reads a column its upstream
stage does not write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from pipelines.core.config import ConfigError

#: in ``writes``: every column that all the stage's inputs have
PASSTHROUGH_MARK = "<inputs>"
PASSTHROUGH = frozenset({PASSTHROUGH_MARK})


class ContractNode(Protocol):
    """What the check reads of a stage."""

    name: str
    inputs: tuple[str, ...]
    requires: tuple[str, ...]
    writes: frozenset[str]

    def columns_read(self) -> dict[str, frozenset[str]]: ...


class ColumnError(ConfigError):
    """A stage reads a column that the upstream stage it reads it from does not write (one line)."""

    def __init__(self, consumer: str, producer: str, missing: Iterable[str]):
        self.consumer, self.producer, self.missing = consumer, producer, sorted(missing)
        quoted = ", ".join(f"'{c}'" for c in self.missing)
        if len(self.missing) == 1:
            text = f"stage {consumer} reads column {quoted} from {producer}, which does not write it"
        else:
            text = f"stage {consumer} reads columns {quoted} from {producer}, which does not write them"
        super().__init__(text)


def written(writes: Iterable[str], input_columns: Sequence[frozenset[str]]) -> frozenset[str]:
    """A stage's output columns: ``writes`` with :data:`PASSTHROUGH` replaced by the columns every
    one of ``input_columns`` (its inputs' output columns) has."""
    writes = frozenset(writes)
    if PASSTHROUGH_MARK not in writes:
        return writes
    kept = frozenset.intersection(*input_columns) if input_columns else frozenset()
    return (writes - PASSTHROUGH) | kept


def output_columns(stages: Sequence[Any]) -> dict[str, frozenset[str]]:
    """``{stage: the columns of its ok rows}`` for ``stages`` in run order (an input that is not among
    them adds nothing to a pass-through)."""
    out: dict[str, frozenset[str]] = {}
    for stage in stages:
        out[stage.name] = written(stage.writes, [out[up] for up in stage.inputs if up in out])
    return out


def check_columns(stages: Sequence[Any]) -> dict[str, frozenset[str]]:
    """Check every edge of ``stages`` (in run order: :func:`pipelines.core.graph.order_nodes`): each
    column a stage reads from an upstream stage is one that stage writes. Returns
    :func:`output_columns`; raises :class:`ColumnError` for the first edge that fails, and
    ``ValueError`` for a stage that declares reads from a stage it neither reads nor requires (a
    mistake in the stage's declaration, not in the recipe)."""
    out = output_columns(stages)
    for stage in stages:
        upstream = (*stage.inputs, *stage.requires)
        for producer, columns in stage.columns_read().items():
            if producer not in upstream:
                raise ValueError(f"stage {stage.name} declares columns it reads from {producer}, which is neither "
                                 f"among its inputs nor its requires ({', '.join(upstream) or 'none'})")
            if producer not in out:  # not built: the graph check names it
                continue
            missing = frozenset(columns) - out[producer]
            if missing:
                raise ColumnError(stage.name, producer, missing)
    return out


def reads_per_input(reads: Mapping[str, Iterable[str]] | Iterable[str],
                    inputs: Sequence[str]) -> dict[str, frozenset[str]]:
    """``reads`` as ``{upstream stage: columns}``: a map as it is, one set for each of ``inputs``."""
    if isinstance(reads, Mapping):
        return {name: frozenset(columns) for name, columns in reads.items()}
    return {name: frozenset(reads) for name in inputs}
