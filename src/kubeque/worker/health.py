"""Health endpoints and the small HTTP server that carries them with ``/metrics``.

``/healthz`` (liveness) answers 200 while the event loop keeps beating: a loop
blocked by a handler that never yields fails it. ``/readyz`` (readiness)
answers 200 while the worker runs and the store answered its last check
recently; 503 otherwise, including from the moment shutdown begins.

The server runs in a daemon thread (standard library WSGI, one thread per
request), so a busy event loop cannot delay a probe or a scrape.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from .runtime import Worker

logger = logging.getLogger("kubeque.health")


class Health:
    """What the probes report, fed by the process: loop beats and store checks.

    ``stall_after``: seconds without a loop beat before liveness fails.
    ``store_stale_after``: seconds since the last successful store check
    before readiness fails (a check that fails makes it fail at once).
    """

    def __init__(self, *, stall_after: float = 15.0, store_stale_after: float = 30.0) -> None:
        self.stall_after = stall_after
        self.store_stale_after = store_stale_after
        self.worker: Worker | None = None
        self.stopping = False
        self._beat = time.monotonic()
        self._store_ok_at: float | None = None
        self._store_error: str | None = "not checked yet"

    def beat(self) -> None:
        """The event loop is alive (called from the loop)."""
        self._beat = time.monotonic()

    def store_checked(self, error: str | None) -> None:
        """Record a store check: ``None`` if it answered, else what went wrong."""
        self._store_error = error
        if error is None:
            self._store_ok_at = time.monotonic()

    def live(self) -> tuple[bool, str]:
        quiet = time.monotonic() - self._beat
        if quiet > self.stall_after:
            return False, f"event loop unresponsive for {quiet:.0f}s"
        dead = self.worker.dead_loop if self.worker is not None else None
        if dead is not None:
            return False, f"worker loop {dead} stopped unexpectedly"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if self.worker is None or not self.worker.running:
            return False, "worker not running"
        if self._store_error is not None:
            return False, f"store unreachable: {self._store_error}"
        if self._store_ok_at is None or time.monotonic() - self._store_ok_at > self.store_stale_after:
            return False, "store not checked recently"
        return True, "ok"

    async def run_beat(self, interval: float = 1.0) -> None:
        """Beat every ``interval`` seconds until cancelled."""
        while True:
            self.beat()
            await asyncio.sleep(interval)


WsgiApp = Callable[["WSGIEnvironment", "StartResponse"], Iterable[bytes]]


def make_app(registry: CollectorRegistry, health: Health) -> WsgiApp:
    """A WSGI app serving ``/metrics``, ``/healthz`` and ``/readyz``."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path in ("/healthz", "/readyz"):
            ok, reason = health.live() if path == "/healthz" else health.ready()
            body = (reason + "\n").encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        body = b"not found: try /metrics, /healthz or /readyz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [body]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http %s", format % args)


class HealthServer:
    """Serves :func:`make_app` on ``host:port`` in a daemon thread (port 0: any free port)."""

    def __init__(self, registry: CollectorRegistry, health: Health, *, host: str = "0.0.0.0", port: int = 0) -> None:
        self._server = make_server(
            host, port, make_app(registry, health), server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="kubeque-http", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
