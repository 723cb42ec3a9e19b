"""HTTP endpoints of the local blob store: PUT and GET on `/blobs/{key}` of the side listener.

Only requests whose URL the server signed get through (`LocalBlobStore.authorize`). A PUT is
streamed to a temporary file in bounded chunks and published atomically, or refused with nothing
kept: 403 bad or expired signature, 400 bad key, 415 wrong Content-Type, 413 more bytes than the
URL allows (as soon as they arrive), 409 an object already there. A GET streams the file with
headers that stop browsers from rendering it in the listener's origin.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from threadline_server.blobs.local import (
    BlobRefused,
    LocalBlobStore,
    LocalSink,
    ObjectExists,
    ObjectMissing,
    TooLarge,
    WrongContentType,
)
from threadline_server.domain.uploads import content_disposition, normalize_content_type

# Bytes handed to the writer thread at once: big enough to amortize the thread hop, small enough
# that an upload never holds more than about twice this in memory.
WRITE_CHUNK = 256 * 1024


class LocalBlobHttp:
    """aiohttp handlers for the local blob store; mount with `add_routes(app.router)`."""

    def __init__(self, store: LocalBlobStore, write_chunk: int = WRITE_CHUNK) -> None:
        self._store = store
        self._write_chunk = write_chunk

    def add_routes(self, router: web.UrlDispatcher) -> None:
        # add_get also answers HEAD, which authorize() treats as GET.
        router.add_put("/blobs/{key:.+}", self.handle_put)
        router.add_get("/blobs/{key:.+}", self.handle_get)

    async def handle_put(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._put(request)
        except BlobRefused as refused:
            return await _refuse_and_hang_up(request, refused)

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._get(request)
        except BlobRefused as refused:
            return _refusal(refused)

    async def _put(self, request: web.Request) -> web.StreamResponse:
        store = self._store
        grant = store.authorize("PUT", request.match_info["key"], request.query)
        sent_type = normalize_content_type(request.headers.get("Content-Type", ""))
        if sent_type != grant.content_type:
            raise WrongContentType(f"Content-Type must be {grant.content_type}")
        declared = request.content_length
        if declared is not None and declared > grant.max_size:
            raise TooLarge(f"more than {grant.max_size} bytes")
        # Cheap early answer; the atomic link in commit() is what actually forbids overwrites.
        if await asyncio.to_thread(store.exists, grant.key):
            raise ObjectExists("an object already exists under this key")
        sink = await asyncio.to_thread(store.open_sink, grant)
        try:
            await self._receive(request, sink)
            info = await asyncio.to_thread(sink.commit)
        except BaseException:
            # Synchronous on purpose: a close and an unlink, and it must run even when the
            # request task is being cancelled (client gone).
            sink.abort()
            raise
        return web.json_response(
            {"size": info.size, "sha256": info.sha256, "content_type": info.content_type},
            status=201,
        )

    async def _receive(self, request: web.Request, sink: LocalSink) -> None:
        limit = sink.grant.max_size
        received = 0
        pending = bytearray()
        async for chunk in request.content.iter_chunked(self._write_chunk):
            received += len(chunk)
            if received > limit:
                # Refuse the moment the limit is passed; the partial file is discarded.
                raise TooLarge(f"more than {limit} bytes")
            pending += chunk
            if len(pending) >= self._write_chunk:
                await asyncio.to_thread(sink.write, bytes(pending))
                pending.clear()
        if pending:
            await asyncio.to_thread(sink.write, bytes(pending))

    async def _get(self, request: web.Request) -> web.StreamResponse:
        grant = self._store.authorize(request.method, request.match_info["key"], request.query)
        found = await asyncio.to_thread(self._store.locate, grant.key)
        if found is None:
            raise ObjectMissing("no such object")
        headers = {
            "Content-Type": found.content_type,
            "Content-Disposition": content_disposition(grant.download_name),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, no-store",
        }
        # FileResponse streams from disk (sendfile where available) and handles Range/HEAD.
        return web.FileResponse(found.path, headers=headers)


async def _refuse_and_hang_up(request: web.Request, refused: BlobRefused) -> web.StreamResponse:
    """Answers, then closes the connection at once. Left to itself aiohttp would go on reading
    and discarding the unread body for up to `lingering_time` (10 s), which also holds up the
    listener's shutdown. The answer is flushed before the close; a client still sending more
    than the socket buffers hold (megabytes) may see a connection reset instead of it."""
    response = _refusal(refused)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.protocol is not None:
        request.protocol.force_close()
    return response


def _refusal(refused: BlobRefused) -> web.Response:
    return web.json_response({"error": refused.message}, status=refused.status)
