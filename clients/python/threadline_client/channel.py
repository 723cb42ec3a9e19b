"""Channel configuration for the SDK: keepalive, message limits, retry service config, stubs.

Kept apart from the API helpers in `client.py` because these values are agreed with the server's
settings (reliability bar 3.1) and are what an operator or a test inspects, not what an
application calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc.aio

from threadline.v1 import (
    realtime_service_pb2_grpc,
    thread_service_pb2_grpc,
    upload_service_pb2_grpc,
    user_service_pb2_grpc,
)

if TYPE_CHECKING:
    from threadline.v1.realtime_service_pb2_grpc import RealtimeServiceAsyncStub
    from threadline.v1.thread_service_pb2_grpc import ThreadServiceAsyncStub
    from threadline.v1.upload_service_pb2_grpc import UploadServiceAsyncStub
    from threadline.v1.user_service_pb2_grpc import UserServiceAsyncStub

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "DEFAULT_TIMEOUT",
    "RETRYABLE_METHODS",
    "RETRY_POLICY",
    "Stubs",
    "service_config",
]

RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    # UNAVAILABLE only: it means the request was not processed (or, for the writes below, that
    # repeating it is harmless). RESOURCE_EXHAUSTED is never retried here because the channel
    # would ignore RetryInfo; callers wait `retry_after` themselves.
    "retryableStatusCodes": ["UNAVAILABLE"],
}
"""The gRPC retryPolicy applied to `RETRYABLE_METHODS` (reliability bar 3.1)."""

RETRYABLE_METHODS: dict[str, tuple[str, ...]] = {
    "threadline.v1.ThreadService": (
        # Reads.
        "GetThread",
        "ListThreads",
        "ListMessages",
        # Writes that carry a client_op_id (the helpers always set one), so the server answers
        # a repeat with the stored result instead of doing the work twice.
        "CreateThread",
        "UpdateThread",
        "DeleteThread",
        "ArchiveThread",
        "UnarchiveThread",
        "AddParticipants",
        "RemoveParticipants",
        # No client_op_id, but the marker merges by maximum, so a repeat changes nothing.
        "MarkRead",
    ),
    "threadline.v1.UserService": ("GetMe",),
    "threadline.v1.UploadService": ("CreateUpload", "GetDownloadUrl"),
    # Submit's state-changing frames (send_message, operation) carry client_op_id; the rest
    # (ping, ack, typing, refresh_auth) are harmless to repeat.
    "threadline.v1.RealtimeService": ("Submit",),
}
"""Methods the channel retries on UNAVAILABLE: reads, and writes safe to repeat."""


def service_config() -> str:
    """Returns the channel's service config JSON (the retry policy for `RETRYABLE_METHODS`)."""
    names = [
        {"service": service, "method": method}
        for service, methods in RETRYABLE_METHODS.items()
        for method in methods
    ]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]})


DEFAULT_CHANNEL_OPTIONS: dict[str, Any] = {
    # Agreed with the server's keepalive policy (min_ping_interval_without_data 10 s): pinging
    # more often than that gets the connection closed with GOAWAY too_many_pings.
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 1,
    # Server frames are bounded below 1 MiB (max_send_message_length on the server); anything
    # larger is a bug or an attack, not a message worth buffering.
    "grpc.max_receive_message_length": 1024 * 1024,
    "grpc.enable_retries": 1,
    "grpc.service_config": service_config(),
}
"""Channel arguments per reliability bar 3.1; `options=` entries override them by key."""

DEFAULT_TIMEOUT = 10.0
"""Default deadline for unary calls, in seconds ("always set a deadline"). Streams have none."""


@dataclass(frozen=True, slots=True)
class Stubs:
    """The raw generated async stubs on the client's channel (authenticated, no error mapping).

    Calls made through these raise `grpc.aio.AioRpcError` and get no default deadline; they
    exist for protocol-level tests that need exact control over requests.

    Attributes:
        threads: ThreadService.
        users: UserService.
        uploads: UploadService.
        realtime: RealtimeService.
    """

    threads: ThreadServiceAsyncStub
    users: UserServiceAsyncStub
    uploads: UploadServiceAsyncStub
    realtime: RealtimeServiceAsyncStub

    @classmethod
    def for_channel(cls, channel: grpc.aio.Channel) -> Stubs:
        """Builds the four stubs on one channel."""
        return cls(
            threads=thread_service_pb2_grpc.ThreadServiceStub(channel),
            users=user_service_pb2_grpc.UserServiceStub(channel),
            uploads=upload_service_pb2_grpc.UploadServiceStub(channel),
            realtime=realtime_service_pb2_grpc.RealtimeServiceStub(channel),
        )
