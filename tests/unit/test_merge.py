"""Three-way merge properties (hypothesis) and the documented examples."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from threadline_server.domain.merge import (
    CONFLICT,
    merge_fields,
    merge_scalar,
    merge_tags,
    merge_text,
)

words = st.lists(st.sampled_from(["a", "b", "c", "dd", "eee", "f"]), min_size=0, max_size=12)
texts = words.map(" ".join)
# Distinct words: with repeats ("a b b b") a diff may align an edit to either copy, and merge3
# then rightly calls two edits that look apart overlapping (a conflict, never a wrong merge).
distinct_words = st.lists(
    st.sampled_from(["a", "b", "c", "dd", "eee", "f", "g", "hh", "i", "jj", "k", "l"]),
    min_size=0,
    max_size=12,
    unique=True,
)


@given(texts, texts)
def test_one_sided_change_wins(base, other):
    assert merge_text(base, base, other) == other
    assert merge_text(base, other, base) == other


@given(texts, texts)
def test_identical_changes_are_no_conflict(base, changed):
    assert merge_text(base, changed, changed) == changed


@given(distinct_words, st.integers(0, 11), st.integers(0, 11))
def test_edits_to_different_words_both_apply(tokens, i, j):
    if len(tokens) < 2:
        return
    i, j = i % len(tokens), j % len(tokens)
    if abs(i - j) < 2:  # adjacent edits touch the same gap: merge3 may call them overlapping
        return
    server, client = list(tokens), list(tokens)
    server[i], client[j] = "SERVER", "CLIENT"
    merged = merge_text(" ".join(tokens), " ".join(server), " ".join(client))
    assert merged != CONFLICT
    expected = list(tokens)
    expected[i], expected[j] = "SERVER", "CLIENT"
    assert merged == " ".join(expected)


def test_same_word_changed_differently_conflicts():
    assert merge_text("lunch at noon", "lunch at one", "lunch at two") is CONFLICT


def test_scalars_and_tags():
    assert merge_scalar("a", "a", "b") == "b"
    assert merge_scalar("a", "b", "a") == "b"
    assert merge_scalar("a", "b", "c") is CONFLICT
    assert merge_tags(["x", "y"], ["x", "y", "s"], ["y", "c"]) == ["y", "s", "c"]


def test_fields_merge_per_field_and_archived_is_last_write_wins():
    base = {"title": "t", "description": "d", "archived": False}
    server = {"title": "T", "description": "d", "archived": True}
    out = merge_fields(base, server, {"description": "new d", "archived": False})
    assert out.values == {"description": "new d", "archived": False} and out.conflicts == []
    clash = merge_fields(base, server, {"title": "other"})
    assert clash.conflicts == ["title"]
