"""A minimal grpc-web client over plain HTTP (httpx), speaking the wire format a browser's
grpc-web transport does: length-prefixed messages in the body, trailers as a final frame."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from google.rpc import status_pb2

_TRAILERS = 0x80


@dataclass
class GrpcWebResult:
    """What a call ended with: its messages (raw), status code, message and rich details."""

    messages: list[bytes] = field(default_factory=list)
    status: int = -1
    message: str = ""
    details: status_pb2.Status | None = None
    headers: dict[str, str] = field(default_factory=dict)


def frame(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def _trailers(block: bytes, result: GrpcWebResult) -> None:
    for line in block.decode("latin-1").split("\r\n"):
        if ":" in line:
            key, value = line.split(":", 1)
            _status_header(key.strip().lower(), value.strip(), result)


def _status_header(key: str, value: str, result: GrpcWebResult) -> None:
    if key == "grpc-status":
        result.status = int(value)
    elif key == "grpc-message":
        result.message = value
    elif key == "grpc-status-details-bin":
        raw = base64.b64decode(value + "=" * (-len(value) % 4))
        result.details = status_pb2.Status.FromString(raw)


async def messages(response: httpx.Response, result: GrpcWebResult) -> AsyncIterator[bytes]:
    """Each message of a (streaming) response as it arrives; fills `result` from the trailers
    (a trailers-only answer carries them in the headers instead)."""
    for key, value in response.headers.items():
        result.headers[key.lower()] = value
        _status_header(key.lower(), value, result)
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while len(buffer) >= 5:
            flags, length = buffer[0], struct.unpack(">I", buffer[1:5])[0]
            if len(buffer) < 5 + length:
                break
            payload, buffer = buffer[5 : 5 + length], buffer[5 + length :]
            if flags & _TRAILERS:
                _trailers(payload, result)
            else:
                result.messages.append(payload)
                yield payload


def headers(token: str | None, origin: str | None = None) -> dict[str, str]:
    out = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
    if token:
        out["authorization"] = f"Bearer {token}"
    if origin:
        out["origin"] = origin
    return out


async def unary(
    client: httpx.AsyncClient,
    url: str,
    request: bytes,
    token: str | None,
    origin: str | None = None,
) -> GrpcWebResult:
    result = GrpcWebResult()
    async with client.stream(
        "POST", url, content=frame(request), headers=headers(token, origin)
    ) as response:
        async for _ in messages(response, result):
            pass
    return result
