"""Threadline's async Python SDK: client, realtime stream, typed errors and token handling.

Typical use::

    async with await ThreadlineClient.connect("localhost:50051", token) as client:
        thread = await client.create_thread("Launch", ["u2"])
        async with client.open_stream() as stream:
            result = await stream.send_message(thread.id, "hello")
"""

from __future__ import annotations

from threadline_client.auth import (
    DEFAULT_REFRESH_MARGIN,
    BearerAuthInterceptor,
    StaticToken,
    TokenCache,
    TokenClaims,
    TokenProvider,
    bearer_metadata,
    decode_jwt_claims,
    refresh_margin,
)
from threadline_client.backoff import Backoff
from threadline_client.channel import (
    DEFAULT_CHANNEL_OPTIONS,
    DEFAULT_TIMEOUT,
    RETRY_POLICY,
    RETRYABLE_METHODS,
    Stubs,
    service_config,
)
from threadline_client.client import ThreadlineClient
from threadline_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    ThreadlineError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    error_class,
    from_rpc_error,
    from_status_proto,
    is_retryable,
    make_error,
)
from threadline_client.ids import new_op_id
from threadline_client.stream import RealtimeStream, result_error

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "DEFAULT_REFRESH_MARGIN",
    "DEFAULT_TIMEOUT",
    "RETRYABLE_METHODS",
    "RETRY_POLICY",
    "Aborted",
    "AlreadyExists",
    "Backoff",
    "BearerAuthInterceptor",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "RealtimeStream",
    "ResourceExhausted",
    "StaticToken",
    "Stubs",
    "ThreadlineClient",
    "ThreadlineError",
    "TokenCache",
    "TokenClaims",
    "TokenProvider",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "__version__",
    "bearer_metadata",
    "decode_jwt_claims",
    "error_class",
    "from_rpc_error",
    "from_status_proto",
    "is_retryable",
    "make_error",
    "new_op_id",
    "refresh_margin",
    "result_error",
    "service_config",
]

# Client state and the self-healing session (state.py, session.py).
from threadline_client.session import (
    Resolver,
    ThreadlineSession,
    accept_server,
    load_snapshot,
)
from threadline_client.state import (
    Change,
    ChangeKind,
    ClientState,
    ClientStore,
    ConflictInfo,
    ConnectionState,
    LocalMessage,
    MessageStatus,
    OpError,
    OpKind,
    OpOutcome,
    OpStatus,
    PendingOp,
    Snapshot,
    SnapshotView,
    ThreadView,
    snapshot_view,
)

__all__ += [
    "Change",
    "ChangeKind",
    "ClientState",
    "ClientStore",
    "ConflictInfo",
    "ConnectionState",
    "LocalMessage",
    "MessageStatus",
    "OpError",
    "OpKind",
    "OpOutcome",
    "OpStatus",
    "PendingOp",
    "Resolver",
    "Snapshot",
    "SnapshotView",
    "ThreadView",
    "ThreadlineSession",
    "accept_server",
    "load_snapshot",
    "snapshot_view",
]
