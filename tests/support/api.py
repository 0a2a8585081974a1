"""For the history API tests: an in-process client, reading a response's ids and errors, and a SQLite database
that cannot even be read (another connection in exclusive locking mode holding a write)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI


class ReadLock:
    """Holds a SQLite file so that no other connection can read it (``locking_mode=EXCLUSIVE`` plus a write).

    In WAL mode ``BEGIN EXCLUSIVE`` alone still lets readers in; exclusive locking mode does not. Released by
    closing the connection.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._connection: sqlite3.Connection | None = None

    def __enter__(self) -> ReadLock:
        connection = sqlite3.connect(self._path, isolation_level=None, timeout=10)
        connection.execute("PRAGMA locking_mode=EXCLUSIVE")
        connection.execute("BEGIN EXCLUSIVE")
        connection.execute("CREATE TABLE IF NOT EXISTS read_lock_probe (x INTEGER)")
        self._connection = connection
        return self

    def __exit__(self, *_: object) -> None:
        if self._connection is not None:
            self._connection.rollback()
            self._connection.close()
            self._connection = None


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def ids(response: httpx.Response) -> list[str]:
    body = response.json()
    return [item.get("trade_id") or item.get("signal_id") for item in body["data"]]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"data", "error", "correlation_id"}, body
    assert body["data"] is None and body["error"]["code"] == code and body["error"]["message"]
    assert body["correlation_id"] == response.headers["X-Correlation-ID"]
    assert "detail" not in response.text
    return body
