"""Three-way merges: text by words (merge3), tag sets by element, scalars by value.

Each merge takes the base (what the client edited from), the server's current value and the
client's value, and returns the merged value or `CONFLICT` when both sides changed the same part
differently. Pure functions: no I/O, easy to property-test.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import merge3

_TOKENS = re.compile(r"\s+|\S+")


class _Conflict:
    def __repr__(self) -> str:
        return "CONFLICT"


CONFLICT: Final = _Conflict()


def merge_scalar(base: Any, server: Any, client: Any) -> Any:
    """A value changed on one side wins; the same change on both sides is no conflict."""
    if server == client or client == base:
        return server
    if server == base:
        return client
    return CONFLICT


def merge_text(base: str, server: str, client: str) -> str | _Conflict:
    """Word-level three-way merge: edits to different words merge, edits to the same words
    conflict. Whitespace runs are tokens too, so spacing edits merge like words."""
    if server == client or client == base:
        return server
    if server == base:
        return client
    b, s, c = (_TOKENS.findall(t) for t in (base, server, client))
    merger = merge3.Merge3(b, s, c)
    out: list[str] = []
    for region in merger.merge_regions():
        kind = region[0]
        if kind == "conflict":
            return CONFLICT
        if kind == "unchanged":
            out.extend(b[region[1] : region[2]])
        elif kind in ("a", "same"):
            out.extend(s[region[1] : region[2]])
        elif kind == "b":
            out.extend(c[region[1] : region[2]])
    return "".join(out)


def merge_tags(base: Sequence[str], server: Sequence[str], client: Sequence[str]) -> list[str]:
    """Set semantics: additions and removals from both sides all apply (never a conflict).
    Order: the server's order, then the client's additions in its order."""
    added = [t for t in client if t not in base]
    removed = {t for t in base if t not in client}
    merged = [t for t in server if t not in removed]
    merged += [t for t in added if t not in merged]
    return merged


@dataclass(frozen=True)
class FieldMerge:
    """The outcome of merging several fields: merged values, or the fields that conflict."""

    values: dict[str, Any]
    conflicts: list[str]


def last_write_wins(base: Any, server: Any, client: Any) -> Any:
    """Simple scalar state (archived): the client's write is the latest; never a conflict."""
    return client


MERGERS = {
    "title": merge_scalar,
    "description": merge_text,
    "tags": merge_tags,
    "archived": last_write_wins,
}


def merge_fields(
    base: dict[str, Any], server: dict[str, Any], client: dict[str, Any]
) -> FieldMerge:
    """Merges each field the client changed; `archived` and unknown scalars use merge_scalar."""
    values: dict[str, Any] = {}
    conflicts: list[str] = []
    for name, value in client.items():
        merged = MERGERS.get(name, merge_scalar)(base[name], server[name], value)
        if merged is CONFLICT:
            conflicts.append(name)
        else:
            values[name] = merged
    return FieldMerge(values, conflicts)
