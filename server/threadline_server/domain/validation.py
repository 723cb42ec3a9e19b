"""Field rules shared by the unary RPCs and the stream: each failure is a field violation."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from threadline_server.errors import FieldViolation, InvalidArgument

_OP_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_USER_ID = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_PAGE_SIZE = 200
DEFAULT_PAGE_SIZE = 50


class Violations:
    """Collects every violation of a request, so one response names all bad fields."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def check_id(v: Violations, field: str, value: str, what: str = "id") -> None:
    if not value:
        v.add(field, f"{what} is required")
    elif not _ID.match(value):
        v.add(field, f"{what} must be 1-64 characters of [A-Za-z0-9_-]")


def check_user_ids(v: Violations, field: str, values: Sequence[str], max_count: int) -> None:
    if len(values) > max_count:
        v.add(field, f"at most {max_count} user ids")
    for i, uid in enumerate(values):
        if not _USER_ID.match(uid):
            v.add(f"{field}[{i}]", "user id must be 1-128 characters of [A-Za-z0-9_.@:-]")


def check_op_id(v: Violations, field: str, value: str, *, required: bool) -> None:
    if not value:
        if required:
            v.add(field, "client_op_id is required")
    elif not _OP_ID.match(value):
        v.add(field, "client_op_id must be 1-64 characters of [A-Za-z0-9._:-]")


def check_text(
    v: Violations, field: str, text: str, *, max_bytes: int, allow_empty: bool = False
) -> None:
    size = len(text.encode("utf-8"))
    if size == 0 and not allow_empty:
        v.add(field, "text must not be empty")
    elif size > max_bytes:
        v.add(field, f"text is {size} bytes; the limit is {max_bytes}")
    if "\x00" in text:
        v.add(field, "text must not contain NUL characters")


def check_title(v: Violations, field: str, title: str, max_chars: int) -> None:
    if not title.strip():
        v.add(field, "title must not be empty")
    elif len(title) > max_chars:
        v.add(field, f"title is {len(title)} characters; the limit is {max_chars}")
    elif _CONTROL.search(title) or "\n" in title:
        v.add(field, "title must not contain control characters")


def check_description(v: Violations, field: str, value: str) -> None:
    if len(value) > 2000:
        v.add(field, "description is longer than 2000 characters")
    if "\x00" in value:
        v.add(field, "description must not contain NUL characters")


def check_tags(v: Violations, field: str, tags: Sequence[str]) -> None:
    if len(tags) > 20:
        v.add(field, "at most 20 tags")
    if len(set(tags)) != len(tags):
        v.add(field, "tags must be unique")
    for i, tag in enumerate(tags):
        if not 1 <= len(tag) <= 50 or _CONTROL.search(tag):
            v.add(f"{field}[{i}]", "tag must be 1-50 characters without control characters")


def page_size(v: Violations, field: str, value: int) -> int:
    if value < 0:
        v.add(field, "page_size must not be negative")
        return DEFAULT_PAGE_SIZE
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def payload_hash(kind: str, **fields: Any) -> bytes:
    """Canonical hash of an operation, to tell a retry from a reused idempotency key."""
    blob = json.dumps({"kind": kind, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).digest()
