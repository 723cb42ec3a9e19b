"""Opaque page tokens: a versioned keyset cursor bound to the request's other parameters."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from threadline_server.errors import InvalidArgument

T = TypeVar("T")


def _fingerprint(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode(position: dict[str, Any], params: dict[str, Any]) -> str:
    body = {"v": 1, "p": _fingerprint(params), "k": position}
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, params: dict[str, Any], field: str = "page_token") -> dict[str, Any]:
    """The position in `token`; INVALID_ARGUMENT if it is malformed or was issued for other
    parameters."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        ok = isinstance(body, dict) and body.get("v") == 1 and isinstance(body.get("k"), dict)
    except ValueError:
        ok = False
    if not ok:
        raise InvalidArgument.one(field, "page_token is malformed")
    if body["p"] != _fingerprint(params):
        raise InvalidArgument.one(field, "page_token was issued for different request parameters")
    position: dict[str, Any] = body["k"]
    return position


def fit(items: Sequence[T], measure: Callable[[T], int], max_bytes: int) -> list[T]:
    """The longest prefix of `items` whose sizes sum to at most `max_bytes`, and never fewer than
    one item: a page always makes progress (the startup check proves one item always fits)."""
    out: list[T] = []
    total = 0
    for item in items:
        total += measure(item)
        if out and total > max_bytes:
            break
        out.append(item)
    return out
