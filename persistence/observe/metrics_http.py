"""The stand-alone ``/metrics`` endpoint for embedded use without the history API.

When ``PERSISTENCE_METRICS_PORT`` is set, :class:`~persistence.PersistenceSidecar` serves its own registry on
``127.0.0.1`` at that port with :func:`prometheus_client.start_http_server` (one daemon thread) from ``start()``
until ``close()``. It only does so while persistence is enabled at start-up: with
``ENABLE_DATABASE_PERSISTENCE=false`` the sidecar starts no thread at all, this one included. A port that cannot be
bound is logged (``metrics_exporter_failed``) and never stops start-up: observability must not break trading.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from persistence.observe.logger import get_logger

log = get_logger("persistence.exporter")

DEFAULT_HOST = "127.0.0.1"


class MetricsExporter:
    """A running ``/metrics`` HTTP server for one registry; :meth:`close` stops it and frees the port."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port: int = server.server_port
        self._closed = False

    @classmethod
    def start(cls, port: int, registry: CollectorRegistry, host: str = DEFAULT_HOST) -> MetricsExporter:
        """Serve ``registry`` at ``http://host:port/metrics`` (any path answers); raises ``OSError`` if taken."""
        server, thread = start_http_server(port, addr=host, registry=registry)
        thread.name = f"persistence-metrics-{server.server_port}"
        log.info("metrics_exporter_started", host=host, port=server.server_port)
        return cls(server, thread, host)

    @property
    def url(self) -> str:
        """Where Prometheus scrapes this exporter."""
        return f"http://{self.host}:{self.port}/metrics"

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread: a few milliseconds (the listening socket is shut down
        first, which wakes the server's loop at once instead of at its next poll, up to 0.5 s later).

        Idempotent. Call it off the event loop (``asyncio.to_thread``) from async code.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.socket.shutdown(socket.SHUT_RDWR)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)
        log.info("metrics_exporter_stopped", port=self.port)


def start_exporter(port: int | None, registry: CollectorRegistry, *, enabled: bool) -> MetricsExporter | None:
    """The exporter a sidecar runs: ``None`` when no port is set, when persistence is off, or when the port is taken."""
    if port is None:
        return None
    if not enabled:
        log.info("metrics_exporter_skipped", port=port, reason="persistence_disabled")
        return None
    try:
        return MetricsExporter.start(port, registry)
    except OSError as error:
        log.error(
            "metrics_exporter_failed", host=DEFAULT_HOST, port=port, error_class=type(error).__name__, error=str(error)
        )
        return None
