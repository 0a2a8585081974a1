"""A writer-process prototype, measured beside the threaded sidecar (issue 21, "Move the CPU off the host").

Not the sidecar and not for shipping: the smallest thing that tells whether moving the encoding, hashing and SQL of
a batch into a child process (the second core, a heap of its own) would shorten the host's latencies and stalls.

The host validates each record on its loop (``Trade.parse``, as ``record_trade`` does: a bad record must raise in
the caller), queues it with a future and, once per loop iteration, sends the queued records in batches of
:data:`BATCH` to the child over its stdin (a frame: batch id, length, the serialized values). The child decodes a
batch, encodes the rows as the schema stores them, reads the stored rows of the batch's keys and the chain's head,
builds the audit entries with the project's own :class:`VersionEncoder` and :func:`linked_entries`, writes rows and
entries in one ``BEGIN IMMEDIATE … COMMIT`` and acks the batch id on its stdout; the host resolves the batch's
futures. Left out, so the figures are a floor for the design: the journal, receipts' states, the breaker, retries,
the version rule beyond "new keys only", supervision of the child.

Run as ``python -m benchmarks.writer_process DB_PATH INSTANCE SERIALIZER`` (the child); the host side is
:class:`ProcessWriter`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pickle
import sqlite3
import struct
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import sqlite as sqlite_dialect

from persistence.audit.chain import GENESIS, AuditHead, VersionEncoder, linked_entries
from persistence.audit.trail import HEAD_SQL, column_kinds
from persistence.db.rowcodec import DriverBatch
from persistence.db.schema import audit_log, trades
from persistence.records.models import Trade

BATCH = 500
"""Records per frame (the sidecar's writer commits batches of up to 500 too)."""
FRAME = struct.Struct("!II")
ACK = struct.Struct("!I")
FIELDS = tuple(Trade.model_fields)
REPO_ROOT = Path(__file__).resolve().parent.parent


def _pickle_records(records: list[Trade]) -> bytes:
    return pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)


def _unpickle_records(body: bytes) -> list[dict[str, Any]]:
    return [record.__dict__ for record in pickle.loads(body)]


def _pickle_tuples(records: list[Trade]) -> bytes:
    return pickle.dumps([tuple(record.__dict__.values()) for record in records], protocol=pickle.HIGHEST_PROTOCOL)


def _unpickle_tuples(body: bytes) -> list[dict[str, Any]]:
    return [dict(zip(FIELDS, values, strict=True)) for values in pickle.loads(body)]


def _pickle_text(records: list[Trade]) -> bytes:
    # Every value as text on the host (str() of a Decimal and of a datetime), parsed back in the child: pickle then
    # moves only strings and None, its fastest case.
    return pickle.dumps(
        [[v if v is None or type(v) is str else str(v) for v in record.__dict__.values()] for record in records],
        protocol=pickle.HIGHEST_PROTOCOL,
    )


_KINDS = column_kinds(trades)
_PARSERS: tuple[Callable[[str], Any] | None, ...] = tuple(
    Decimal if _KINDS.get(name) == "decimal" else datetime.fromisoformat if _KINDS.get(name) == "datetime" else None
    for name in FIELDS
)


def _unpickle_text(body: bytes) -> list[dict[str, Any]]:
    pairs = tuple(zip(FIELDS, _PARSERS, strict=True))
    return [
        {
            name: value if value is None or parse is None else parse(value)
            for (name, parse), value in zip(pairs, row, strict=True)
        }
        for row in pickle.loads(body)
    ]


SERIALIZERS: dict[str, tuple[Callable[[list[Trade]], bytes], Callable[[bytes], list[dict[str, Any]]]]] = {
    "pickle-records": (_pickle_records, _unpickle_records),
    "pickle-tuples": (_pickle_tuples, _unpickle_tuples),
    "pickle-text": (_pickle_text, _unpickle_text),
}
"""Host-side encoder and child-side decoder of a batch, by name. msgspec and orjson join when installed."""

if importlib.util.find_spec("msgspec") is not None:  # pragma: no cover - not a dependency of the project
    import msgspec

    _msgpack_encoder = msgspec.msgpack.Encoder(decimal_format="string")

    def _msgspec_tuples(records: list[Trade]) -> bytes:
        return bytes(_msgpack_encoder.encode([tuple(record.__dict__.values()) for record in records]))

    def _unmsgspec_tuples(body: bytes) -> list[dict[str, Any]]:
        from benchmarks.validators import MsgspecTrade

        decoded = msgspec.msgpack.decode(body, type=list[tuple[Any, ...]])
        return [
            msgspec.structs.asdict(msgspec.convert(dict(zip(FIELDS, v, strict=True)), MsgspecTrade)) for v in decoded
        ]

    SERIALIZERS["msgspec-tuples"] = (_msgspec_tuples, _unmsgspec_tuples)


class ChildWriter:
    """The child's side: one SQLite connection, the project's encoders, one transaction per batch."""

    def __init__(self, path: str, instance_id: str) -> None:
        dialect = sqlite_dialect.dialect(paramstyle="qmark")
        self.instance_id = instance_id
        self.rows = DriverBatch(insert(trades), trades, dialect)
        self.entries = DriverBatch(insert(audit_log), audit_log, dialect)
        self.encode = VersionEncoder(FIELDS, column_kinds(trades)).encode
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.connection.execute("PRAGMA busy_timeout=5000")

    def commit(self, records: list[dict[str, Any]]) -> None:
        instance = self.instance_id
        values = [{**record, "instance_id": instance} for record in records]
        keys = [value["trade_id"] for value in values]
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            stored = {
                row[0]
                for row in connection.execute(
                    f"SELECT trade_id FROM trades WHERE trade_id IN ({','.join('?' * len(keys))})", keys
                )
            }
            fresh = [value for value in values if value["trade_id"] not in stored]
            found = connection.execute(HEAD_SQL, (instance,)).fetchall()
            head = AuditHead(instance, int(found[0][0]), str(found[0][1])) if found else None
            encode = self.encode
            versions = [("trade", value["trade_id"], encode(value), GENESIS) for value in fresh]  # first versions
            entries = linked_entries(head, instance, versions, datetime.now(UTC))
            connection.executemany(self.rows.sql, self.rows.encode(fresh))
            connection.executemany(self.entries.sql, self.entries.encode(entries))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


def child_main(path: str, instance_id: str, serializer: str) -> None:
    """Ack 0 once ready; then read frames from stdin until it closes, commit each batch, ack its id on stdout."""
    decode = SERIALIZERS[serializer][1]
    writer = ChildWriter(path, instance_id)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sink.write(ACK.pack(0))  # ready: imported, connected
    sink.flush()
    while True:
        header = source.read(FRAME.size)
        if len(header) < FRAME.size:
            return
        batch_id, size = FRAME.unpack(header)
        writer.commit(decode(source.read(size)))
        sink.write(ACK.pack(batch_id))
        sink.flush()


class ProcessWriter:
    """The host's side: ``record_trade`` validates and queues; a batch goes to the child once per loop iteration."""

    def __init__(self, path: Path, serializer: str, instance_id: str = "bench-process") -> None:
        self.path = path
        self.serializer = serializer
        self.instance_id = instance_id
        self._encode = SERIALIZERS[serializer][0]
        self._pending: list[tuple[Trade, asyncio.Future[None]]] = []
        self._in_flight: dict[int, list[asyncio.Future[None]]] = {}
        self._next_id = 0
        self._scheduled = False
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.writer_process",
            str(self.path),
            self.instance_id,
            self.serializer,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        assert self._process.stdout is not None
        await self._process.stdout.readexactly(ACK.size)  # the child is ready
        self._reader = asyncio.ensure_future(self._read_acks())

    def record_trade(self, mapping: Any) -> asyncio.Future[None]:
        record = Trade.parse(mapping)
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending.append((record, future))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._send)
        return future

    def _send(self) -> None:
        self._scheduled = False
        assert self._process is not None and self._process.stdin is not None
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), BATCH):
            chunk = pending[start : start + BATCH]
            body = self._encode([record for record, _ in chunk])
            self._next_id += 1
            self._in_flight[self._next_id] = [future for _, future in chunk]
            self._process.stdin.write(FRAME.pack(self._next_id, len(body)) + body)

    async def _read_acks(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        while True:
            try:
                data = await stdout.readexactly(ACK.size)
            except asyncio.IncompleteReadError:  # the child ended: what it did not ack fails, nothing waits forever
                ended = RuntimeError("the writer process ended before acknowledging its batches")
                for futures in self._in_flight.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(ended)
                self._in_flight.clear()
                return
            for future in self._in_flight.pop(ACK.unpack(data)[0]):
                future.set_result(None)

    async def flush(self) -> None:
        if self._pending:
            self._send()
        await asyncio.gather(*[future for futures in self._in_flight.values() for future in futures])

    async def close(self) -> None:
        await self.flush()
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.close()
        await self._process.wait()
        if self._reader is not None:
            await self._reader
        if self._process.returncode != 0:
            raise RuntimeError(f"the writer process exited with {self._process.returncode}")


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2], sys.argv[3])
