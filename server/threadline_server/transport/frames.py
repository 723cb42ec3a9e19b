"""Byte bounds of everything the server builds: stream frames, replay pages and unary pages.

gRPC refuses to send a message over `server.max_send_message_bytes` and ends the call with
RESOURCE_EXHAUSTED, so a frame of 60 events of 30 KB, or a history page of 200 messages of
100 KB, would end every retry the same way and wedge the client. Every frame and page is
therefore cut by bytes as well as by count, from the exact encoded size of each item, and always
makes progress: a page holds at least one item, and the startup check (`check_limits`) proves
that the largest item the limits allow fits in one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from threadline.v1 import errors_pb2
from threadline.v1 import realtime_pb2 as rt
from threadline.v1 import realtime_service_pb2 as rs
from threadline_server.config import Settings
from threadline_server.domain import models
from threadline_server.transport import codec

# Room kept for what surrounds the items in a response: the ConnectResponse / ServerFrame /
# EventBatch headers (at most 16 bytes), a request_id (64 characters), a next_page_token (a few
# hundred bytes) and any future small field. Items are measured exactly; this covers the rest.
ENVELOPE_RESERVE = 1024


def varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def item_size(body_bytes: int) -> int:
    """Bytes one element of a repeated message field takes: tag, length prefix and body (field
    numbers of our repeated items are all below 16, so the tag is one byte)."""
    return 1 + varint_size(body_bytes) + body_bytes


def budget(settings: Settings) -> int:
    """Most bytes of items in one frame or page."""
    return settings.server.max_send_message_bytes - ENVELOPE_RESERVE


def chunk(items: Sequence[bytes], max_bytes: int) -> Iterator[list[bytes]]:
    """Consecutive groups of encoded items whose framed sizes sum to at most `max_bytes`; a group
    always holds at least one item, so progress never stops."""
    group: list[bytes] = []
    size = 0
    for item in items:
        cost = item_size(len(item))
        if group and size + cost > max_bytes:
            yield group
            group, size = [], 0
        group.append(item)
        size += cost
    if group:
        yield group


class WireSizes:
    """Exact encoded sizes of page items, for the domain's byte-bounded pages."""

    def message(self, m: models.Message) -> int:
        return item_size(codec.message(m).ByteSize())

    def summary(self, s: models.ThreadSummary) -> int:
        return item_size(codec.summary(s).ByteSize())


# ---- the startup check ---------------------------------------------------------------------

_ID = "i" * 64  # resource ids are at most 64 characters (domain/validation.py)
_USER = "u" * 128  # user ids at most 128
_WIDE = "\U0001f600"  # a 4-byte UTF-8 character: character limits cost up to 4 bytes each
_BIG = 2**62  # a 9-byte varint, beyond any real sequence number or version
_FAR = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


@dataclass(frozen=True)
class LargestItems:
    """Encoded sizes of the largest items the configured limits allow."""

    event: int  # a message event (the largest kind) as an element of an EventBatch
    summary: int  # a thread summary with its last message, as an element of ListThreads
    conflict: int  # a merge conflict result: base, server and client versions of a message
    client_frame: int  # a SendMessage frame at the limits, as a client sends it


def largest_items(settings: Settings) -> LargestItems:
    lim = settings.limits
    attachment = models.Attachment(
        _ID,
        _WIDE * 255,
        "c" * max([255, *(len(t) for t in settings.storage.allowed_content_types)]),
        _BIG,
        "f" * 64,
    )
    message = models.Message(
        _ID,
        _ID,
        _BIG,
        _USER,
        "m" * lim.max_message_bytes,
        _BIG,
        True,
        _FAR,
        _FAR,
        (attachment,) * lim.max_attachments,
    )
    thread = models.Thread(
        _ID,
        _WIDE * lim.max_title_chars,
        _WIDE * 2000,
        (_WIDE * 50,) * 20,
        (_USER,) * lim.max_participants,
        True,
        _USER,
        _BIG,
        _BIG,
        _FAR,
        _FAR,
    )
    event = models.Event(
        _BIG,
        models.EventKind.MESSAGE_UPDATED,
        _ID,
        _BIG,
        _BIG,
        _USER,
        _FAR,
        message,
        frozenset(),
        client_op_id="o" * 64,
    )
    summary = models.ThreadSummary(thread, _BIG, _BIG, message)
    send = rs.ConnectRequest(
        frame=rt.ClientFrame(
            request_id="r" * 64,
            send_message=rt.SendMessage(
                client_op_id="o" * 64,
                thread_id=_ID,
                text="m" * lim.max_message_bytes,
                attachment_ids=[_ID] * lim.max_attachments,
            ),
        )
    )
    snapshot = codec.snapshot(message)
    conflict = rs.ConnectResponse(
        frame=rt.ServerFrame(
            request_id="r" * 64,
            operation_result=rt.OperationResult(
                client_op_id="o" * 64,
                conflict=errors_pb2.Conflict(
                    base=snapshot,
                    server=snapshot,
                    client=snapshot,
                    server_version=_BIG,
                    fields=["text"],
                ),
            ),
        )
    )
    return LargestItems(
        event=item_size(codec.event(event, for_author=True).ByteSize()),
        summary=item_size(codec.summary(summary).ByteSize()),
        conflict=conflict.ByteSize(),
        client_frame=send.ByteSize(),
    )


def check_limits(settings: Settings) -> LargestItems:
    """Refuses to start when the largest allowed item could not be sent in one frame, or the
    largest allowed message could not be received: a page must always be able to make progress.
    """
    largest = largest_items(settings)
    room = budget(settings)
    srv = settings.server
    biggest = max(largest.event, largest.summary, largest.conflict)
    if biggest > room:
        raise ValueError(
            f"server.max_send_message_bytes ({srv.max_send_message_bytes}) is too small for the "
            f"largest item the limits allow ({biggest} bytes plus {ENVELOPE_RESERVE} of "
            "envelope): raise it or lower limits.max_message_bytes, limits.max_attachments or "
            "limits.max_participants"
        )
    if largest.client_frame > srv.max_receive_message_bytes:
        raise ValueError(
            f"server.max_receive_message_bytes ({srv.max_receive_message_bytes}) is below the "
            f"largest message frame a client may send ({largest.client_frame} bytes): raise it "
            "or lower limits.max_message_bytes"
        )
    return largest
