"""``audit verify``'s rows and deletions checks in a process of their own, beside the chain walk.

The chain walk (hashes, in Python) and the rows check (a comparison SQLite or PostgreSQL runs) need no answer from
each other unless ``since_last_anchor`` names the keys to check. So with ``jobs=N`` :func:`~persistence.audit.verify.
verify` starts ``N - 1`` children of this module (``python -m persistence.audit.rows_worker``: no
``multiprocessing``, which would import the host's ``__main__`` again), each checking the rows of its part of every
table's keys (the parts cut once by the parent; the first part's child checks deletions too), walks the chains
itself, and reads the children's results.

The protocol is JSON lines. The parent writes one request on the child's stdin: the database settings the engine
needs, ``instance_id``, ``chunk``, ``ranges`` and ``deletions`` (the URL, which may hold a password, never appears on
a command line). The child writes ``{"progress": n}`` after each chunk (``n`` rows or keys more) and ends with
``{"rows": {...}, "broken": {...} | null, "where": [table index, 0 row | 1 deletion] | null}``, or
``{"error": "..."}`` when it could not check (exit status 1). Anything else (a crash, a kill) is an
:class:`~persistence.errors.AuditVerifyError` in the parent, naming the exit status and the end of the child's
stderr. A child is killed if the parent stops waiting (a break in a chain ends the verify at once). The parent keeps
the child's stdin open until it is done with it: a child whose stdin ends (its parent killed, even by ``kill -9``)
exits at once, even in the middle of a long statement (PostgreSQL itself notices the closed connection when that
statement ends, at the latest at the query timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import site
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from persistence.config import Settings
from persistence.errors import AuditVerifyError

ENGINE_SETTINGS = ("database_url", "query_timeout_ms", "sqlite_cache_mib", "pool_size", "max_overflow")
"""What :func:`~persistence.db.engine.create_database` reads of the settings: the child builds its engine alike."""
MESSAGE_LIMIT = 64 * 1024 * 1024
"""The longest line the child may write: a break quotes the values that differ, and a text field may be long."""
STDERR_KEPT = 2_000
"""Characters of the child's stderr quoted in an error."""


class RowsWorker:
    """The child process checking rows and deletions; :meth:`result` waits for its verdict."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._stderr = b""
        assert process.stderr is not None
        self._drain = asyncio.create_task(self._keep_stderr(process.stderr))

    @classmethod
    async def start(
        cls,
        settings: Settings,
        instance_id: str | None,
        chunk: int,
        ranges: dict[str, tuple[str | None, str | None]],
        part: int,
    ) -> RowsWorker:
        """Start the child and hand it its request: the part of each table's keys it checks (``ranges``: after, up
        to); part 0 also checks deletions."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # not the current directory first: it may hold another copy of the package
            "-m",
            __name__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_child_environment(),
            limit=MESSAGE_LIMIT,
        )
        request = {
            "settings": {name: getattr(settings, name) for name in ENGINE_SETTINGS},
            "instance_id": instance_id,
            "chunk": chunk,
            "ranges": ranges,
            "deletions": part == 0,
        }
        assert process.stdin is not None
        process.stdin.write(json.dumps(request).encode() + b"\n")
        with contextlib.suppress(ConnectionError):  # a child that died at once: reported by result()
            await process.stdin.drain()
        return cls(process)  # stdin stays open: the child exits when it ends

    async def _keep_stderr(self, stream: asyncio.StreamReader) -> None:
        while block := await stream.read(65_536):
            self._stderr = (self._stderr + block)[-STDERR_KEPT:]

    async def result(
        self, progress: Callable[[int], None]
    ) -> tuple[dict[str, int], dict[str, Any] | None, tuple[int, int] | None]:
        """The rows checked per table, the first break (a dict of :class:`~persistence.audit.verify.Break`'s fields)
        and where it was found (table index, 0 for a row or 1 for a deletion), once the child is done; its progress is
        passed on as it comes."""
        stdout = self._process.stdout
        assert stdout is not None
        outcome: dict[str, Any] | None = None
        while True:
            try:
                line = await stdout.readline()
            except ValueError as error:  # a line past MESSAGE_LIMIT
                raise AuditVerifyError(f"the rows check's process wrote a message too long to read: {error}") from None
            if not line:
                break
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not the protocol's (a library printing on the child's stdout): ignored
            if not isinstance(message, dict):
                continue
            if "progress" in message:
                progress(int(message["progress"]))
            elif "rows" in message or "error" in message:
                outcome = message
        status = await self._process.wait()
        await self._drain
        if outcome is not None and "error" in outcome:
            raise AuditVerifyError(f"the rows check could not finish: {outcome['error']}")
        if outcome is None or status != 0:
            tail = self._stderr.decode(errors="replace").strip()
            raise AuditVerifyError(
                f"the rows check's process ended with exit status {status} before its result"
                + (f": {tail}" if tail else "")
            )
        where = outcome["where"]
        rows = {str(table): int(count) for table, count in outcome["rows"].items()}
        return rows, outcome["broken"], None if where is None else (int(where[0]), int(where[1]))

    def kill(self) -> None:
        """Kill the child if it still runs (at once: no wait, so a cancellation cannot come between two kills)."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    async def stop(self) -> None:
        """Kill the child if it still runs, and reap it."""
        self.kill()
        await self._process.wait()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain


def _child_environment() -> dict[str, str]:
    """The host's environment, with this package's own folder first on ``PYTHONPATH``: the child imports the same
    ``persistence`` as the parent, even one a host put on ``sys.path`` at run time (a vendored copy, a source tree)."""
    home = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    if home in site.getsitepackages() or home == site.getusersitepackages():
        return dict(os.environ)  # installed: the child finds it where the parent did, after the standard library
    return {**os.environ, "PYTHONPATH": home if not path else os.pathsep.join((home, path))}


async def _check(request: dict[str, Any]) -> dict[str, Any]:
    from persistence.audit.verify import rows_and_deletions
    from persistence.db.engine import create_database

    # The parent's own validated values, taken as they are: the child's environment (the host's, which may hold
    # anything) is not read again.
    settings = Settings.model_construct(**request["settings"])
    database = create_database(settings)

    sent = 0

    def progress(done: int) -> None:  # told the total so far; the parent is sent what is new
        nonlocal sent
        _send({"progress": done - sent})
        sent = done

    try:
        ranges = {table: (after, upto) for table, (after, upto) in request["ranges"].items()}
        rows, broken, where = await rows_and_deletions(
            database, request["instance_id"], request["chunk"], progress, ranges, request["deletions"]
        )
    finally:
        await database.dispose()
    return {"rows": rows, "broken": None if broken is None else asdict(broken), "where": where}


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _exit_when_orphaned() -> None:
    """Wait for the end of stdin, which the parent holds open while it waits for this child, and exit then: a
    parent that is gone (killed, even by ``kill -9``) leaves no child running a long statement."""
    descriptor = sys.stdin.fileno()  # read below the buffered reader, whose lock a daemon thread must not hold
    while os.read(descriptor, 65_536):
        pass
    os._exit(3)


def main() -> int:
    """The child's entry point: one request on stdin, its progress and result on stdout."""
    request = json.loads(sys.stdin.buffer.readline())
    threading.Thread(target=_exit_when_orphaned, name="rows-worker-orphan-watch", daemon=True).start()
    try:
        result = asyncio.run(_check(request))
    except Exception as error:
        _send({"error": f"{type(error).__name__}: {error}"})
        return 1
    _send(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
