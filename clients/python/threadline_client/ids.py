"""Client-generated identifiers: idempotency keys for writes and stream operations."""

from __future__ import annotations

import uuid

__all__ = ["new_op_id"]


def new_op_id() -> str:
    """Returns a fresh `client_op_id` (32 hex characters, within `[A-Za-z0-9._:-]{1,64}`).

    Random rather than sequential so keys from restarted or concurrent clients of one user never
    collide within the server's 24-hour idempotency window.
    """
    return uuid.uuid4().hex
