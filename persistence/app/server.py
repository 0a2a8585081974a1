"""Serving an ASGI app with uvicorn inside the caller's event loop, with the caller in charge of signals.

``uvicorn.Server.serve()`` normally captures SIGINT/SIGTERM and re-raises them once it has stopped, which would
kill a process that still has a sidecar to close. :class:`ApiServer` binds the socket itself (so a port in use is a
clear error before anything starts), runs ``serve()`` as a task without touching signal handlers, and is stopped by
:meth:`ApiServer.stop`. Uvicorn's own logging is left unconfigured and its access log off.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from persistence.errors import ApiPortUnavailableError, PersistenceError

__all__ = ["ApiPortUnavailableError", "ApiServer", "bind", "url_host"]


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; raises :class:`ApiPortUnavailableError`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ApiPortUnavailableError(host, port, exc.strerror or str(exc)) from exc
    sock.setblocking(False)
    return sock


def url_host(host: str) -> str:
    """The host part of a URL that reaches a server bound to ``host``."""
    if host in ("0.0.0.0", ""):  # noqa: S104 - this maps the wildcard to a reachable address, it binds nothing
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class ApiServer:
    """An ASGI app served by uvicorn as a task of the running loop."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.host = host
        self._socket = bind(host, port)
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            app, log_config=None, access_log=False, log_level="warning", lifespan="on", timeout_graceful_shutdown=3
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        return f"http://{url_host(self.host)}:{self.port}"

    async def start(self) -> None:
        """Start serving; returns once the server accepts connections (raises if start-up failed)."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="persistence-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise PersistenceError("the API server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, finish open requests (at most a few seconds) and run the app's shutdown."""
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._socket.close()
