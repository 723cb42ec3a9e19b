"""HTTP endpoints of the local blob store: PUT and GET on `/blobs/{key}` of the side listener.

Only requests whose URL the server signed get through (`LocalBlobStore.authorize`). A PUT is
streamed to a temporary file in bounded chunks and published atomically, or refused with nothing
kept: 403 bad or expired signature, 400 bad key, 415 wrong Content-Type, 413 more bytes than the
URL allows (as soon as they arrive), 409 an object already there. A GET streams the file with
headers that stop browsers from rendering it in the listener's origin.

CORS, for the web app's uploads and downloads: only the allowed web origins (`web.allowed_origins`,
else the server's own HTTP origins: the list the grpc-web edge uses), each echoed exactly, never
`*`, no credentials (the signature in the URL is the authorization). A preflight for another
origin, method or header is refused 403 with no CORS headers; answers to other origins carry none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

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

# What a browser may do cross-origin with a signed URL: PUT the file (its signed Content-Type),
# GET or HEAD it (Range for media seeking), and read the headers it needs.
CORS_METHODS = ("GET", "HEAD", "PUT")
CORS_REQUEST_HEADERS = ("content-type", "range")
CORS_EXPOSE_HEADERS = ("ETag", "Content-Length", "Content-Range", "Content-Disposition")
CORS_MAX_AGE_S = 86_400


class LocalBlobHttp:
    """aiohttp handlers for the local blob store; mount with `add_routes(app.router)`.

    `origins` returns the browser origins allowed by CORS (read per request: the list is known
    only once the listener has its port); None answers no browser cross-origin at all.
    """

    def __init__(
        self,
        store: LocalBlobStore,
        write_chunk: int = WRITE_CHUNK,
        *,
        origins: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self._store = store
        self._write_chunk = write_chunk
        self._origins = origins

    def add_routes(self, router: web.UrlDispatcher) -> None:
        # add_get also answers HEAD, which authorize() treats as GET.
        router.add_put("/blobs/{key:.+}", self.handle_put)
        router.add_get("/blobs/{key:.+}", self.handle_get)
        router.add_route("OPTIONS", "/blobs/{key:.+}", self.handle_preflight)

    async def handle_put(self, request: web.Request) -> web.StreamResponse:
        cors = self._cors(request)
        try:
            response = await self._put(request)
        except BlobRefused as refused:
            return await _refuse_and_hang_up(request, refused, cors)
        response.headers.update(cors)
        return response

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        cors = self._cors(request)
        try:
            return await self._get(request, cors)
        except BlobRefused as refused:
            return _refusal(refused, cors)

    async def handle_preflight(self, request: web.Request) -> web.Response:
        """A CORS preflight: allowed only for an allowed origin asking for an allowed method and
        allowed headers; anything else is 403 with no CORS headers, so the browser stops."""
        cors = self._cors(request)
        method = request.headers.get("Access-Control-Request-Method", "")
        asked = request.headers.get("Access-Control-Request-Headers", "")
        headers = {h.strip().lower() for h in asked.split(",") if h.strip()}
        if not cors or method not in CORS_METHODS or not headers <= set(CORS_REQUEST_HEADERS):
            return web.json_response(
                {"error": "cross-origin request not allowed"},
                status=403,
                headers={"Vary": "Origin"},
            )
        return web.Response(
            status=204,
            headers={
                **cors,
                "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
                "Access-Control-Allow-Methods": ", ".join(CORS_METHODS),
                "Access-Control-Allow-Headers": ", ".join(CORS_REQUEST_HEADERS),
                "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
            },
        )

    def _cors(self, request: web.Request) -> dict[str, str]:
        """The CORS headers of an answer to this request: empty unless its Origin is allowed."""
        origin = request.headers.get("Origin")
        if origin is None or self._origins is None or origin not in self._origins():
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": ", ".join(CORS_EXPOSE_HEADERS),
            "Vary": "Origin",
        }

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

    async def _get(self, request: web.Request, cors: dict[str, str]) -> web.StreamResponse:
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
            **cors,
        }
        # FileResponse streams from disk (sendfile where available) and handles Range/HEAD.
        return web.FileResponse(found.path, headers=headers)


async def _refuse_and_hang_up(
    request: web.Request, refused: BlobRefused, cors: dict[str, str]
) -> web.StreamResponse:
    """Answers, then closes the connection at once. Left to itself aiohttp would go on reading
    and discarding the unread body for up to `lingering_time` (10 s), which also holds up the
    listener's shutdown. The answer is flushed before the close; a client still sending more
    than the socket buffers hold (megabytes) may see a connection reset instead of it."""
    response = _refusal(refused, cors)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.protocol is not None:
        request.protocol.force_close()
    return response


def _refusal(refused: BlobRefused, cors: dict[str, str]) -> web.Response:
    # With the CORS headers, so the web app can read why its upload was refused.
    return web.json_response({"error": refused.message}, status=refused.status, headers=cors)
