"""Side HTTP listener: the embedded issuer's JWKS, signed local file URLs, a liveness probe."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web


class SideHttp:
    """A small aiohttp app on its own port, started and stopped with the gRPC server."""

    def __init__(
        self,
        host: str,
        port: int,
        jwks: Callable[[], dict[str, Any]] | None,
        routes: Callable[[web.UrlDispatcher], None] | None = None,
        metrics: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._app = web.Application()
        if jwks is not None:
            document = jwks

            async def serve_jwks(_request: web.Request) -> web.Response:
                return web.json_response(document(), headers={"Cache-Control": "max-age=300"})

            self._app.router.add_get("/.well-known/jwks.json", serve_jwks)

        async def healthz(_request: web.Request) -> web.Response:
            return web.Response(text="ok")

        self._app.router.add_get("/healthz", healthz)
        if metrics is not None:
            render = metrics

            async def serve_metrics(_request: web.Request) -> web.Response:
                return web.Response(
                    body=await render(),
                    content_type="text/plain",
                    charset="utf-8",
                    headers={"X-Content-Type-Options": "nosniff"},
                )

            self._app.router.add_get("/metrics", serve_metrics)
        if routes is not None:  # e.g. signed local file URLs; aiohttp freezes routes on start
            routes(self._app.router)
        self._runner = web.AppRunner(self._app, access_log=None)
        self.port = port

    async def start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only here
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()
