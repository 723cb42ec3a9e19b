"""A bare gRPC-over-HTTP/2 client (h2 on a socket) that sends exactly the headers it is given.

grpcio's own client always advertises gzip in `grpc-accept-encoding`; this one lets a test be a
client that does not, and see each message's compressed flag as it arrives.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class RawMessage:
    compressed: bool
    body: bytes


@dataclass
class RawServerStream:
    """One server-streaming call: response headers and messages as they arrive."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h2.connection.H2Connection
    stream_id: int
    headers: dict[str, str] = field(default_factory=dict)
    messages: list[RawMessage] = field(default_factory=list)
    _buffer: bytes = b""
    ended: bool = False

    async def next_message(self, timeout: float = 5.0) -> RawMessage:
        async with asyncio.timeout(timeout):
            while not self.messages:
                if self.ended:
                    raise EOFError("stream ended")
                await self._pump()
        return self.messages.pop(0)

    async def _pump(self) -> None:
        data = await self.reader.read(65_536)
        if not data:
            self.ended = True
            return
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.headers.update(_decode(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._buffer += event.data
                self._split()
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                self.ended = True
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    def _split(self) -> None:
        while len(self._buffer) >= 5:
            flag, length = struct.unpack(">BI", self._buffer[:5])
            if len(self._buffer) < 5 + length:
                return
            self.messages.append(RawMessage(bool(flag), self._buffer[5 : 5 + length]))
            self._buffer = self._buffer[5 + length :]

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def server_stream(
    host: str, port: int, path: str, request: bytes, metadata: list[tuple[str, str]]
) -> RawServerStream:
    """Opens a call with `request` as its only message and no headers beyond `metadata`."""
    reader, writer = await asyncio.open_connection(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.increment_flow_control_window(4 * 1024 * 1024)
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"{host}:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ],
    )
    conn.send_data(stream_id, struct.pack(">BI", 0, len(request)) + request, end_stream=True)
    writer.write(conn.data_to_send())
    await writer.drain()
    return RawServerStream(reader, writer, conn, stream_id)


def _decode(headers: list[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in headers
    }
