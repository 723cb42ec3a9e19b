"""Side HTTP listener: the web app, the embedded issuer's JWKS, signed local file URLs, dev
sign-in, metrics and a liveness probe."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

RouteAdder = Callable[[web.UrlDispatcher], None]


@dataclass
class WebContext:
    """What the browser-facing routes know about the running node. The composition root fills
    it in as the listeners come up: the HTTP port (hence the default origins) is known only once
    this listener is bound, the edge's port after that."""

    # Browser origins allowed (exact scheme://host[:port]): CORS and dev sign-in's CSRF check.
    origins: frozenset[str] = frozenset()
    # The grpc-web edge's bound port, while it runs.
    edge_port: int | None = None
    # The origin signed file URLs point to (local listener or GCS), for the app's CSP.
    blob_origin: str = ""

    def allows(self, origin: str | None) -> bool:
        return origin is not None and origin in self.origins


class SideHttp:
    """A small aiohttp app on its own port, started and stopped with the gRPC server."""

    def __init__(
        self,
        host: str,
        port: int,
        jwks: Callable[[], dict[str, Any]] | None,
        routes: Iterable[RouteAdder] = (),
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
        # Signed file URLs, dev sign-in, the web app (last: its top-level file route must not
        # shadow the fixed ones). aiohttp freezes routes on start.
        for add in routes:
            add(self._app.router)
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
