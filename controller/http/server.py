"""The agent's HTTP surface (aiohttp): /metrics, /healthz, /readyz.

/healthz answers 200 while the event loop runs (a wedged loop cannot answer at all, which is
what a liveness probe should detect). /readyz answers 200 only when the agent says it is ready
(e.g. store cache synced and first reconcile done), else 503 with the reasons in the body.
`HttpServer` starts and stops inside the agent's own event loop (AppRunner + TCPSite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], tuple[bool, str]]  # -> (ready, reason when not ready)


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


def make_app(registry: CollectorRegistry, readiness: ReadinessCheck) -> web.Application:
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

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class HttpServer:
    """Serves `make_app(...)` on host:port (port 0 picks a free one, see `port` after start)."""

    def __init__(self, registry: CollectorRegistry, readiness: ReadinessCheck,
                 host: str = "127.0.0.1", port: int = 9477):
        self.host = host
        self._requested_port = port
        self._runner = web.AppRunner(make_app(registry, readiness), access_log=None)
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
