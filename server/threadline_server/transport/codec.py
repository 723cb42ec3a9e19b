"""The only place protobuf meets the domain: records to messages, and pre-encoded frames."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from threadline.v1 import (
    errors_pb2,
    message_pb2,
    realtime_pb2,
    realtime_service_pb2,
    thread_pb2,
    upload_pb2,
    user_pb2,
)
from threadline_server.domain import models, uploads
from threadline_server.realtime.session import EventBytes

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ts(value: datetime | None) -> Timestamp | None:
    """Seconds and nanos set directly: protobuf's FromDatetime (through calendar.timegm) cost
    three times as much, and every message carries two timestamps (docs/performance.md)."""
    if value is None:
        return None
    if value.tzinfo is None:  # as FromDatetime(value.astimezone(UTC)) read it: local time
        value = value.astimezone(UTC)
    since = value - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def ts_epoch(seconds: float) -> Timestamp:
    """As FromNanoseconds(int(seconds * 1e9)), without its Python steps (presence, Welcome)."""
    nanos = int(seconds * 1e9)
    return Timestamp(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def thread(t: models.Thread) -> thread_pb2.Thread:
    return thread_pb2.Thread(
        name=f"threads/{t.id}",
        id=t.id,
        title=t.title,
        description=t.description,
        tags=list(t.tags),
        participant_ids=list(t.participant_ids),
        archived=t.archived,
        creator_id=t.creator_id,
        last_seq=t.last_seq,
        version=t.version,
        create_time=ts(t.created_at),
        update_time=ts(t.updated_at),
    )


def message(m: models.Message) -> message_pb2.Message:
    return message_pb2.Message(
        name=f"threads/{m.thread_id}/messages/{m.id}",
        id=m.id,
        thread_id=m.thread_id,
        seq=m.seq,
        author_id=m.author_id,
        text=m.text,
        attachments=[
            message_pb2.Attachment(
                upload_id=a.upload_id,
                file_name=a.file_name,
                content_type=a.content_type,
                size_bytes=a.size_bytes,
                sha256=a.sha256,
            )
            for a in m.attachments
        ],
        version=m.version,
        deleted=m.deleted,
        create_time=ts(m.created_at),
        update_time=ts(m.updated_at),
    )


# `deleting` never reaches a client: such an upload is already gone for every purpose.
_UPLOAD_STATES = {"pending": 1, "ready": 2, "attached": 3}


def upload(u: uploads.Upload) -> upload_pb2.Upload:
    return upload_pb2.Upload(
        name=f"uploads/{u.id}",
        id=u.id,
        file_name=u.file_name,
        content_type=u.content_type,
        size_bytes=u.size_bytes,
        state=_UPLOAD_STATES.get(u.state, 0),  # type: ignore[arg-type]  # an UploadState value
        sha256=u.sha256,
        uploader_id=u.uploader_id,
        version=u.version,
        create_time=ts(u.created_at),
        expire_time=ts(u.expires_at),
    )


def read_marker(r: models.ReadMarker) -> thread_pb2.ReadMarker:
    return thread_pb2.ReadMarker(
        thread_id=r.thread_id, user_id=r.user_id, read_seq=r.read_seq, unread_count=r.unread_count
    )


def summary(s: models.ThreadSummary) -> thread_pb2.ThreadSummary:
    return thread_pb2.ThreadSummary(
        thread=thread(s.thread),
        unread_count=s.unread_count,
        read_seq=s.read_seq,
        last_message=message(s.last_message) if s.last_message else None,
    )


def user(u: models.User) -> user_pb2.User:
    return user_pb2.User(
        name=f"users/{u.id}",
        id=u.id,
        display_name=u.display_name,
        email=u.email,
        image_url=u.image_url,
        create_time=ts(u.created_at),
    )


def preferences(p: models.Preferences) -> user_pb2.UserPreferences:
    return user_pb2.UserPreferences(
        theme=p.theme,  # type: ignore[arg-type]  # an int of the Theme enum
        locale=p.locale,
        time_zone=p.time_zone,
        notifications_enabled=p.notifications_enabled,
        version=p.version,
    )


def snapshot(
    payload: models.Message | models.Thread | models.ReadMarker,
) -> errors_pb2.ResourceSnapshot:
    if isinstance(payload, models.Message):
        return errors_pb2.ResourceSnapshot(message=message(payload))
    if isinstance(payload, models.Thread):
        return errors_pb2.ResourceSnapshot(thread=thread(payload))
    return errors_pb2.ResourceSnapshot(read_marker=read_marker(payload))


def event(e: models.Event, for_author: bool) -> realtime_pb2.Event:
    out = realtime_pb2.Event(
        change_seq=e.change_seq,
        kind=e.kind.value,  # type: ignore[arg-type]  # mirrors EventKind
        thread_id=e.thread_id,
        thread_seq=e.thread_seq,
        version=e.version,
        client_op_id=e.client_op_id if for_author else "",
        actor_id=e.actor_id,
        create_time=ts(e.created_at),
    )
    p = e.payload
    if isinstance(p, models.Message):
        out.message.CopyFrom(message(p))
    elif isinstance(p, models.Thread):
        out.thread.CopyFrom(thread(p))
    elif isinstance(p, models.ReadMarker):
        out.read_marker.CopyFrom(read_marker(p))
    elif isinstance(p, models.TypingState):
        out.typing.CopyFrom(
            realtime_pb2.TypingState(
                thread_id=p.thread_id,
                user_id=p.user_id,
                active=p.active,
                expire_time=ts_epoch(p.expires_at),
            )
        )
    elif isinstance(p, models.PresenceState):
        out.presence.CopyFrom(
            realtime_pb2.PresenceState(
                user_id=p.user_id, online=p.online, last_active_time=ts_epoch(p.last_active_at)
            )
        )
    elif e.kind is models.EventKind.THREAD_REMOVED:
        out.thread.CopyFrom(thread_pb2.Thread(name=f"threads/{e.thread_id}", id=e.thread_id))
    return out


def encode_event(e: models.Event, for_author: bool) -> EventBytes:
    """Serializes an event once; the broker reuses the bytes for every recipient."""
    plain, authored = encode_event_pair(e)
    return authored if for_author else plain


_EVENT_CLIENT_OP_ID = 6  # Event.client_op_id


def encode_event_pair(e: models.Event) -> tuple[EventBytes, EventBytes]:
    """The event for everyone and for its author's streams, from one serialization: the
    author's copy is the same bytes with the client_op_id field appended (a protobuf parser
    takes fields in any order), so a send's event is built and encoded once, not twice."""
    return event_pair_from_raw(event_raw(e), e.change_seq, e.client_op_id)


def event_raw(e: models.Event) -> bytes:
    """The event as everyone but its author gets it (no client_op_id)."""
    return event(e, False).SerializeToString()


def event_pair_from_raw(
    raw: bytes, change_seq: int, client_op_id: str
) -> tuple[EventBytes, EventBytes]:
    """As encode_event_pair, from an event another node encoded (cluster.envelope)."""
    plain = _live(raw, change_seq)
    if not client_op_id:
        return plain, plain
    authored = _live(raw + _field(_EVENT_CLIENT_OP_ID, client_op_id.encode()), change_seq)
    return plain, authored


def _live(raw: bytes, change_seq: int) -> EventBytes:
    """An event with its framing done once for all its recipients: the repeated-field item a
    batch is joined from, and the whole frame of a batch of just this event (most live frames:
    with one event per frame, a subscriber's write is then these bytes, no per-recipient work)."""
    out = EventBytes(raw)
    out.change_seq = change_seq
    out.item = _field(1, raw)
    out.alone = _field(1, _field(4, out.item))
    return out


# --- frames from pre-encoded parts ---------------------------------------------------------
# Protobuf's wire format lets a message field be written as tag + length + bytes, and repeated
# fields concatenate. So a frame of N events is assembled from their cached bytes without
# re-serializing any of them. ConnectResponse and SubscribeResponse both hold the ServerFrame in
# field 1, so one byte string serves both RPCs.

_LEN = 2  # wire type: length-delimited
_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    # Tags and most lengths fit one or two bytes: those skip the loop (it was 6% of a busy
    # fan-out's CPU, building every batched frame).
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(body)) + body


def frame_bytes(frame: realtime_pb2.ServerFrame) -> bytes:
    """A whole response message (ConnectResponse or SubscribeResponse) for one ServerFrame."""
    return _field(1, frame.SerializeToString())


def events_frame_bytes(events: Sequence[bytes], *, replay: bool = False) -> bytes:
    """One frame of events; an event from `encode_event_pair` brings its framing (see `_live`)."""
    first = events[0] if len(events) == 1 else None
    if not replay and isinstance(first, EventBytes) and first.alone:
        return first.alone
    batch = b"".join(_item(e) for e in events)
    if replay:
        batch += b"\x10\x01"  # EventBatch.replay = true
    return _field(1, _field(4, batch))


def _item(e: bytes) -> bytes:
    return e.item if isinstance(e, EventBytes) and e.item else _field(1, e)


def decode_connect(data: bytes) -> realtime_service_pb2.ConnectResponse:
    """For tests and debugging: bytes back into a ConnectResponse."""
    return realtime_service_pb2.ConnectResponse.FromString(data)
