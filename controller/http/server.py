"""The agent's HTTP surface (aiohttp): /metrics, /healthz, /readyz, /status and the mesh page.

/healthz answers 200 while the event loop runs (a wedged loop cannot answer at all, which is
what a liveness probe should detect). /readyz answers 200 only when the agent says it is ready
(e.g. store cache synced and first reconcile done), else 503 with the reasons in the body.
/status is the node's observed state as JSON; /mesh is a page for people that draws the node's
networks from /mesh/data (every asset inline, so it works without any network access; a
Content-Security-Policy allows nothing else). Everything here reads memory the agent already
holds; /mesh/data may also read etcd, bounded by its provider's timeout.
`HttpServer` starts and stops inside the agent's own event loop (AppRunner + TCPSite).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable
from importlib.resources import files

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], tuple[bool, str]]  # -> (ready, reason when not ready)
StatusView = Callable[[], dict]  # -> the /status document
MeshView = Callable[[], Awaitable[dict]]  # -> the /mesh/data document
MESH_TIMEOUT = 5.0  # /mesh/data answers 503 rather than waiting longer


def _mesh_page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: only its own inline script and style (by
    hash) and requests back to the agent."""
    page = files("controller.http").joinpath("mesh.html").read_text()

    def digest(tag: str) -> str:
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    csp = (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
           "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, csp


class Readiness:
    """Named gates that must all be open before the agent is ready.

    >>> r = Readiness(["store cache synced", "first reconcile done"])
    >>> r()
    (False, 'waiting for: store cache synced, first reconcile done')
    >>> r.open("store cache synced"); r.open("first reconcile done"); r()
    (True, 'ready')
    """

    def __init__(self, gates: Iterable[str]):
        self._waiting = list(dict.fromkeys(gates))  # keeps the order for messages

    def open(self, gate: str) -> None:
        if gate in self._waiting:
            self._waiting.remove(gate)

    def close(self, gate: str) -> None:
        """Not ready again, e.g. the store cache lost its watch and is re-listing."""
        if gate not in self._waiting:
            self._waiting.append(gate)

    def __call__(self) -> tuple[bool, str]:
        if self._waiting:
            return False, "waiting for: " + ", ".join(self._waiting)
        return True, "ready"


def make_app(registry: CollectorRegistry, readiness: ReadinessCheck, *,
             status: StatusView | None = None, mesh: MeshView | None = None) -> web.Application:
    page, csp = _mesh_page()

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        try:
            ready, reason = readiness()
        except Exception as e:  # a broken check must say so, not take the endpoint down
            ready, reason = False, f"readiness check failed: {e!r}"
        return web.Response(status=200 if ready else 503, text=reason + "\n")

    async def status_doc(_request: web.Request) -> web.Response:
        return web.json_response(status() if status else {})

    async def mesh_page(_request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html",
                            headers={"Content-Security-Policy": csp, "Cache-Control": "no-store"})

    async def mesh_data(_request: web.Request) -> web.Response:
        if mesh is None:
            return web.json_response({"node": "", "networks": [], "problems": ["no mesh view"]})
        try:
            data = await asyncio.wait_for(mesh(), MESH_TIMEOUT)
        except asyncio.TimeoutError:
            return web.json_response({"error": f"no answer within {MESH_TIMEOUT:g} s"}, status=503)
        return web.json_response(data, headers={"Cache-Control": "no-store"})

    async def root(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/mesh")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_doc)
    app.router.add_get("/mesh", mesh_page)
    app.router.add_get("/mesh/data", mesh_data)
    app.router.add_get("/", root)
    return app


class HttpServer:
    """Serves `make_app(...)` on host:port (port 0 picks a free one, see `port` after start)."""

    def __init__(self, registry: CollectorRegistry, readiness: ReadinessCheck,
                 host: str = "127.0.0.1", port: int = 9477, *,
                 status: StatusView | None = None, mesh: MeshView | None = None):
        self.host = host
        self._requested_port = port
        self._runner = web.AppRunner(make_app(registry, readiness, status=status, mesh=mesh),
                                     access_log=None)
        self.port: int | None = None

    async def start(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._requested_port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()
        self.port = None

    async def __aenter__(self) -> "HttpServer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
