"""Per-message compression. The server compresses by level (app.py), so gRPC uses gzip only for
peers that accept it; here each message under the threshold opts out, because gzip on a small
message costs CPU and saves nothing (often it grows)."""

from __future__ import annotations

from typing import Any

import grpc

DEFAULT_THRESHOLD = 10_240


def send_plain_if_small(
    context: grpc.aio.ServicerContext[Any, Any], size: int, threshold: int
) -> None:
    """Call right before the message of `size` bytes is sent."""
    if size < threshold:
        context.disable_next_message_compression()
