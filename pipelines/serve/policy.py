"""Per-request policy: the micro categories that count for one caller (pure functions, no Ray).

A ``/v1/guard`` or ``/v1/moderations`` request may carry ``policy``: a list of our codes, micro (``B5``) or
macro (``B``, which stands for all its micro codes). The guard judges every text as it always does; the
policy only decides which of its unsafe verdicts are flagged (:func:`apply_policy`):

- unsafe, with a micro code in the policy: **flagged**, as without a policy;
- unsafe, with a micro code outside the policy: **reported, not flagged**. ``flagged`` is false and
  ``outside_policy`` true; the code and the score stay in the answer (``/v1/guard``: ``label: unsafe``,
  ``category`` and ``score``; ``/v1/moderations``: ``micro_code`` and ``category_scores``), and the answer's
  ``categories`` are all false, so ``flagged == any(categories)`` still holds;
- unsafe, with no valid code (``unspecified``: the score decided, or the answer named no known code):
  **flagged**, whatever the policy. The guard cannot show that such a text is outside the policy, and a
  moderation that lets through what it could not classify fails open;
- safe: not flagged, as always.

The policy is given in our codes whichever category keys the answer uses (ours or OpenAI's): one
vocabulary, so one policy selects the same texts in both schemes. OpenAI's category names are refused
with a pointer to the codes: ``hate`` or ``illicit`` span several of our macro codes, and six of OpenAI's
categories hold no micro code at all (``configs/taxonomy_openai.yaml``).

Checks (:func:`validate_policy`; each failure is one line naming the entry): a list; not empty (an empty
policy would flag only ``unspecified`` texts: far likelier a client's bug than a wish, so it is refused;
omit ``policy`` to count every category); every entry a string that is a micro or macro code of the
taxonomy, spelled exactly. No ``policy`` (absent or ``null``) is today's behaviour exactly: every unsafe
verdict is flagged, and the answers carry no policy fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from pipelines.core.rows import UNSAFE
from pipelines.core.taxonomy import Taxonomy
from pipelines.serve.moderation import Verdict
from pipelines.serve.openai_mapping import OPENAI_CATEGORIES

#: a policy: the micro codes that count, in taxonomy order
Policy = tuple[str, ...]


class PolicyError(ValueError):
    """A ``policy`` that cannot be read: one line, and the request field it is about (``param``)."""

    def __init__(self, message: str, param: str = "policy"):
        super().__init__(message)
        self.message, self.param = message, param


def _unknown(entry: str, where: str, taxonomy: Taxonomy) -> PolicyError:
    micro, macro = taxonomy.micro_codes, taxonomy.macro_codes
    known = f"micro codes {micro[0]}…{micro[-1]} or macro codes {', '.join(macro)}"
    if entry in OPENAI_CATEGORIES:
        return PolicyError(f"`{where}`: {entry!r} is an OpenAI category; `policy` takes our codes ({known}), "
                           "whichever categories the answer uses", where)
    if entry.strip().upper() in {*micro, *macro}:
        return PolicyError(f"`{where}`: unknown code {entry!r}; did you mean {entry.strip().upper()!r}?", where)
    return PolicyError(f"`{where}`: unknown code {entry!r} ({known})", where)


def validate_policy(value: Any, taxonomy: Taxonomy) -> list[str]:
    """The entries of a request's ``policy``, checked (see the module docstring): a non-empty list of
    micro or macro codes of ``taxonomy``. Raises :class:`PolicyError` naming the first bad entry."""
    if not isinstance(value, list):
        raise PolicyError(f"`policy` must be a list of micro or macro codes (e.g. [\"A\", \"B5\"]), "
                          f"got {type(value).__name__}")
    if not value:
        raise PolicyError("`policy` is an empty list: it would flag only texts without a code; omit `policy` "
                          "to count every category")
    known = {*taxonomy.micro_codes, *taxonomy.macro_codes}
    for i, entry in enumerate(value):
        where = f"policy[{i}]"
        if not isinstance(entry, str):
            raise PolicyError(f"`{where}` must be a code (a string), got {type(entry).__name__}", where)
        if entry not in known:
            raise _unknown(entry, where, taxonomy)
    return value


def expand_policy(codes: Iterable[str], taxonomy: Taxonomy) -> Policy:
    """The micro codes that ``codes`` name, in taxonomy order, each once: a micro code itself, a macro
    code all its micro codes. Raises :class:`PolicyError` for a code that is neither."""
    wanted: set[str] = set()
    macros = {m.code: m for m in taxonomy.macros}
    for i, code in enumerate(codes):
        if code in macros:
            wanted.update(u.code for u in macros[code].micros)
        elif code in taxonomy.micro_codes:
            wanted.add(code)
        else:
            raise _unknown(code, f"policy[{i}]", taxonomy)
    return tuple(code for code in taxonomy.micro_codes if code in wanted)


def parse_policy(value: Any, taxonomy: Taxonomy) -> Policy | None:
    """A request's ``policy`` field, checked and expanded to micro codes; ``None`` (absent or ``null``)
    is no policy."""
    if value is None:
        return None
    return expand_policy(validate_policy(value, taxonomy), taxonomy)


def apply_policy(verdict: Verdict, policy: Policy | None) -> Verdict:
    """The verdict under ``policy``: ``outside_policy`` (so not ``flagged``) iff it is unsafe with a micro
    code that the policy leaves out. Unsafe without a code stays flagged: the guard cannot show the text
    is outside the policy (the module docstring's rule). Without a policy: the verdict unchanged."""
    outside = (policy is not None and verdict.label == UNSAFE and verdict.micro is not None
               and verdict.micro not in policy)
    return dataclasses.replace(verdict, outside_policy=outside) if outside != verdict.outside_policy else verdict


def guard_policy_fields(verdict: Verdict, policy: Policy | None) -> dict[str, Any]:
    """What ``/v1/guard`` adds under a policy: ``outside_policy`` and ``policy`` (its micro codes);
    nothing without one."""
    if policy is None:
        return {}
    return {"outside_policy": verdict.outside_policy, "policy": list(policy)}


def moderation_policy_fields(verdict: Verdict, policy: Policy | None) -> dict[str, Any]:
    """What one ``/v1/moderations`` result adds under a policy: ``outside_policy`` and ``micro_code`` (the
    micro code the guard named: the one the policy was applied to; ``null`` when none); nothing without
    one."""
    if policy is None:
        return {}
    return {"outside_policy": verdict.outside_policy, "micro_code": verdict.micro}
