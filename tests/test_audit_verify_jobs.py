"""``audit verify`` with its rows checked by child processes (``jobs=3``, the command line's default, on a trail
large enough): the same report as one process gives, on an untouched trail and under every attack, whichever part
of the keys holds the break; a chain break still named first and the children killed; a child killed by a signal,
or unable to reach the database, reported as no verdict (exit status 2), never as a pass."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

import persistence
from persistence import AuditVerifyError
from persistence.audit import verify as verify_module
from persistence.audit.anchors import load_anchors
from persistence.audit.report import VerifyReport
from persistence.audit.rows_worker import RowsWorker, _child_environment
from persistence.audit.verify import count_checks, verify
from persistence.db.engine import Database, create_database
from persistence.migrations import upgrade
from persistence.tables.repositories import Repositories
from tests.support import REPO_ROOT
from tests.support.audit import audit_cli, closed_version, tamper
from tests.support.databases import create_postgres_database, drop_postgres_database, make_settings
from tests.support.factories import make_parameter_change, make_signal, make_snapshot, make_trade


@pytest.fixture
async def seeded(database: Database) -> Database:
    """A trail of every kind of record: a trade in three versions (seq 1 to 3), 30 more trades, a signal, a
    snapshot and a parameter change; checked in chunks of 7 so every pass takes several chunks."""
    repos = Repositories(database)
    trade = make_trade(trade_id="T-AUDITED")
    for version in (trade, closed_version(trade, 60, "1.5"), closed_version(trade, 120, "2.5")):
        await repos.trades.save_trade(version)
    for n in range(30):
        await repos.trades.save_trade(make_trade(trade_id=f"T-{n:02d}"))
    await repos.signals.save_signal(make_signal())
    async with database.write() as connection:
        await repos.snapshots.insert(connection, [make_snapshot()])
        await repos.parameters.insert(connection, [make_parameter_change()])
    return database


async def by_jobs(database: Database) -> tuple[VerifyReport, VerifyReport]:
    """The report of one process, and of three (the rows parted between two children)."""
    reports = []
    for jobs in (1, 3):
        done: list[int] = [0]
        report = await verify(
            database, chunk=7, jobs=jobs, parallel_from=0, progress=lambda n, done=done: done.__setitem__(0, n)
        )
        reports.append(report)
        if report.ok:  # the progress reaches the total the command line's bar is given
            assert done[0] == await count_checks(database)
    return reports[0], reports[1]


async def test_three_processes_report_what_one_reports_on_an_untouched_trail(seeded: Database) -> None:
    one, three = await by_jobs(seeded)
    assert three.ok and asdict(three) == asdict(one)
    assert three.rows == {"trades": 31, "signals": 1, "performance_snapshots": 1, "parameter_history": 1}


EDIT_T29 = "UPDATE trades SET pnl = 7 WHERE trade_id = 'T-29'"


@pytest.mark.parametrize(
    ("statements", "where"),
    [
        pytest.param(["DELETE FROM trades WHERE trade_id = 'T-17'"], "T-17", id="row-deleted"),
        pytest.param(["UPDATE signals SET symbol = 'XAUUSD'"], None, id="signal-edited"),
        pytest.param(["DELETE FROM audit_log WHERE seq = 3 AND natural_key = 'T-AUDITED'"], "T-00", id="gap-in-chain"),
        # Two breaks in different parts: the one a single process meets first is named. Every trade row is checked
        # before any trade deletion, and every trade before any signal, whichever part holds the key.
        pytest.param(["UPDATE signals SET symbol = 'XAUUSD'", EDIT_T29], "T-29", id="later-part-earlier-table"),
        pytest.param(["DELETE FROM trades WHERE trade_id = 'T-01'", EDIT_T29], "T-29", id="row-before-deletion"),
        pytest.param(["UPDATE trades SET symbol = 'X' WHERE trade_id IN ('T-02', 'T-29')"], "T-02", id="first-key"),
        # An empty key sorts before every other: the first page of the first part starts below it.
        pytest.param(["UPDATE trades SET trade_id = '' WHERE trade_id = 'T-05'"], "", id="empty-key"),
    ],
)
async def test_any_number_of_processes_name_the_same_break_as_one(
    seeded: Database, database_url: str, statements: list[str], where: str | None
) -> None:
    await tamper(database_url, *statements)
    one, three = await by_jobs(seeded)
    assert not one.ok and one.broken is not None
    # Rows checked before the break differ (each process stops at its own first break); the break itself may not.
    assert three.broken == one.broken
    assert three.heads == one.heads
    if where is not None:
        assert one.broken.natural_key == where


async def test_a_child_takes_the_parents_settings_not_the_environment(
    seeded: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that passes its Settings in code may run in an environment the settings would refuse; the children,
    which inherit that environment, check with the parent's values."""
    monkeypatch.setenv("PERSISTENCE_API_PORT", "not-a-port")
    monkeypatch.setenv("DATABASE_URL", "sqlite+aiosqlite:////nonexistent/elsewhere.db")
    report = await verify(seeded, jobs=3, parallel_from=0)
    assert report.ok and report.rows["trades"] == 31


async def trades_of_another_instance(database_url: str, instance_id: str, trade_ids: list[str]) -> None:
    """Trades written by another orchestrator instance into the same database."""
    other = create_database(make_settings(database_url=database_url, instance_id=instance_id))
    try:
        for trade_id in trade_ids:
            await Repositories(other).trades.save_trade(make_trade(trade_id=trade_id))
    finally:
        await other.dispose()


async def test_one_instance_is_checked_in_parts_too(seeded: Database, database_url: str) -> None:
    """``--instance`` with children: each part holds only that instance's rows (the filter and the part's upper
    bound both reach the statement)."""
    await trades_of_another_instance(database_url, "bot-b", [f"T-B{n:02d}" for n in range(12)])
    await tamper(database_url, "UPDATE trades SET symbol = 'GBPUSD' WHERE trade_id = 'T-B07'")
    mine = seeded.settings.instance_id
    for jobs in (1, 3):
        report = await verify(seeded, instance_id=mine, chunk=5, jobs=jobs, parallel_from=0)
        assert report.ok and report.rows["trades"] == 31, (jobs, report.rows)
        broken = (await verify(seeded, instance_id="bot-b", chunk=5, jobs=jobs, parallel_from=0)).broken
        assert broken is not None and (broken.natural_key, broken.instance_id) == ("T-B07", "bot-b"), jobs


async def test_a_break_in_a_chain_is_named_first_and_the_rows_child_is_killed(
    seeded: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed entry and an edited row: the chain's break is the report (as with one process), and the child
    checking rows is not left running."""
    await tamper(
        database_url,
        'UPDATE audit_log SET payload = REPLACE(payload, \'"pnl":"1.50000000"\', \'"pnl":"9.50000000"\') WHERE seq = 2',
        "DELETE FROM trades WHERE trade_id = 'T-17'",
    )
    started: list[RowsWorker] = []
    start = RowsWorker.start

    async def keep(*args: Any) -> RowsWorker:
        worker = await start(*args)
        started.append(worker)
        return worker

    monkeypatch.setattr(RowsWorker, "start", keep)
    one, three = await by_jobs(seeded)
    assert one.broken is not None and "hash does not match" in one.broken.problem and one.broken.seq == 2
    assert asdict(three) == asdict(one)  # no row counted: the walk ended first
    assert len(started) == 2
    assert all(worker._process.returncode is not None for worker in started)  # reaped, not left behind


async def test_a_rows_child_killed_by_a_signal_is_no_verdict_and_its_sibling_is_stopped(
    seeded: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = RowsWorker.start
    started: list[RowsWorker] = []

    async def first_killed(*args: Any) -> RowsWorker:
        worker = await start(*args)
        if not started:
            os.kill(worker._process.pid, signal.SIGKILL)
        started.append(worker)
        return worker

    monkeypatch.setattr(RowsWorker, "start", first_killed)
    with pytest.raises(AuditVerifyError, match=f"exit status {-signal.SIGKILL} before its result"):
        await verify(seeded, chunk=7, jobs=3, parallel_from=0)
    assert len(started) == 2 and all(worker._process.returncode is not None for worker in started)


async def test_a_rows_child_that_cannot_reach_the_database_says_why(
    seeded: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The child is handed settings it cannot open (a directory where the file should be): its error comes back."""
    (tmp_path / "not-a-database").mkdir()
    elsewhere = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'not-a-database'}")
    start = RowsWorker.start

    async def misdirected(settings: Any, *args: Any) -> RowsWorker:
        return await start(elsewhere, *args)

    monkeypatch.setattr(RowsWorker, "start", misdirected)
    with pytest.raises(AuditVerifyError, match="the rows check could not finish: OperationalError"):
        await verify(seeded, chunk=7, jobs=2, parallel_from=0)


async def test_one_job_a_small_trail_an_in_memory_database_and_since_last_anchor_start_no_process(
    seeded: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def refuse(*args: Any) -> RowsWorker:
        raise AssertionError("no child process expected")

    monkeypatch.setattr(RowsWorker, "start", refuse)
    assert (await verify(seeded, jobs=1, parallel_from=0)).ok
    assert (await verify(seeded, jobs=3)).rows["trades"] == 31  # fewer rows than a child's start-up is worth
    anchors = load_anchors(tmp_path, 30.0)  # no checkpoint yet: every key is checked, here
    assert (await verify(seeded, jobs=3, anchors=anchors, since_last_anchor=True, parallel_from=0)).ok
    memory = create_database(make_settings(database_url="sqlite+aiosqlite:///:memory:"))
    try:
        await upgrade(memory)
        await Repositories(memory).trades.save_trade(make_trade())
        assert (await verify(memory, jobs=2, parallel_from=0)).rows["trades"] == 1
    finally:
        await memory.dispose()


def test_the_command_line_takes_jobs_and_reports_the_same_break_with_one(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default the command checks the rows in children (the threshold lowered here to reach them on five rows),
    and names the break one process names."""
    monkeypatch.setattr(verify_module, "PARALLEL_FROM_ROWS", 0)
    started: list[RowsWorker] = []
    start = RowsWorker.start

    async def counted(*args: Any) -> RowsWorker:
        started.append(await start(*args))
        return started[-1]

    monkeypatch.setattr(RowsWorker, "start", counted)

    async def prepare() -> None:
        database = create_database(make_settings(database_url=sqlite_url, instance_id="desk-1"))
        try:
            await upgrade(database)
            for n in range(5):
                await Repositories(database).trades.save_trade(make_trade(trade_id=f"T-CLI-{n}"))
        finally:
            await database.dispose()

    asyncio.run(prepare())
    good = audit_cli(sqlite_url, "verify")
    assert good.returncode == 0 and "trades: 5 rows match" in good.stdout, good.stdout + good.stderr
    asyncio.run(tamper(sqlite_url, "DELETE FROM trades WHERE trade_id = 'T-CLI-3'"))
    default, single = audit_cli(sqlite_url, "verify"), audit_cli(sqlite_url, "verify", "--jobs", "1")
    assert default.returncode == single.returncode == 1
    assert "BROKEN: " in default.stdout and "'T-CLI-3': audited, but the trades row is gone" in default.stdout
    assert default.stdout.splitlines()[-1] == single.stdout.splitlines()[-1]
    assert len(started) == 2 * 2  # two children for each run with the default of three jobs, none with one
    for refused_jobs in ("0", "33"):
        refused = audit_cli(sqlite_url, "verify", "--jobs", refused_jobs)
        assert refused.returncode == 2 and "--jobs" in refused.stderr and "1 to 32" in refused.stderr


def test_a_child_imports_the_same_package_as_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own folder goes first on the child's ``PYTHONPATH``, before what the host set: a host running a copy of the
    package put on ``sys.path`` at run time gets that copy in the child too."""
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    first, rest = _child_environment()["PYTHONPATH"].split(os.pathsep)
    assert Path(first, "persistence", "__init__.py") == Path(persistence.__file__).resolve() and rest == "/elsewhere"
    monkeypatch.delenv("PYTHONPATH")
    assert Path(_child_environment()["PYTHONPATH"], "persistence", "__init__.py").is_file()


async def test_a_break_quoting_a_long_value_is_named_by_children_too(seeded: Database, database_url: str) -> None:
    """The break quotes the values that differ; a text field 200,000 characters long still comes back whole."""
    long_text = "replace(hex(zeroblob(100000)), '0', 'x')" if seeded.is_sqlite else "repeat('x', 200000)"
    await tamper(database_url, f"UPDATE parameter_history SET reason = {long_text}")
    one, three = await by_jobs(seeded)
    assert one.broken is not None and "reason is 'xxx" in one.broken.problem
    assert three.broken == one.broken


@pytest.mark.parametrize("chunk", [1, 7, 100])
async def test_an_unreadable_row_and_an_edited_one_are_named_in_key_order_whatever_the_chunks(
    sqlite_url: str, chunk: int
) -> None:
    """The first row that breaks, in key order, is named: an edited row before an unreadable one in the same chunk
    is not hidden behind it, whichever the chunk size or the number of processes."""
    database = create_database(make_settings(database_url=sqlite_url))
    try:
        await upgrade(database)
        repos = Repositories(database)
        for n in range(30):
            await repos.trades.save_trade(make_trade(trade_id=f"T-{n:02d}"))
        await tamper(
            sqlite_url,
            "UPDATE trades SET pnl = 7 WHERE trade_id = 'T-03'",
            "UPDATE trades SET entry_time = 'yesterday' WHERE trade_id = 'T-20'",
        )
        for jobs in (1, 3):
            broken = (await verify(database, chunk=chunk, jobs=jobs, parallel_from=0)).broken
            assert broken is not None and broken.natural_key == "T-03", (jobs, broken)
            assert "differs from its latest audited version" in broken.problem
    finally:
        await database.dispose()


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie left for its new parent to reap has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.postgres
async def test_a_rows_child_ends_when_its_parent_is_killed_even_inside_a_long_statement() -> None:
    """``kill -9`` of the process running ``audit verify`` leaves no rows child behind, even one waiting in a
    statement (here on a lock another connection holds, with a query timeout of a minute)."""
    url = await asyncio.to_thread(create_postgres_database, "persistence_orphan")
    try:
        database = create_database(make_settings(database_url=url))
        try:
            await upgrade(database)
            await Repositories(database).trades.save_trade(make_trade())
        finally:
            await database.dispose()
        holder = await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(False))
        try:
            async with holder.transaction():
                await holder.execute("LOCK TABLE trades IN ACCESS EXCLUSIVE MODE")
                parent = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "tests.children.rows_worker_parent",
                    url,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=REPO_ROOT,
                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                )
                assert parent.stdout is not None
                child = int(await asyncio.wait_for(parent.stdout.readline(), 60))
                waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'"
                for _ in range(600):  # until the child's statement waits on the lock
                    await holder.execute("SELECT pg_stat_clear_snapshot()")  # else read once per transaction
                    if await holder.fetchval(waiting, make_url(url).database):
                        break
                    await asyncio.sleep(0.05)
                else:
                    parent.kill()
                    pytest.fail("the rows child never reached its statement")
                parent.kill()
                await parent.wait()
                for _ in range(200):
                    if not _running(child):
                        break
                    await asyncio.sleep(0.05)
                assert not _running(child), "the rows child outlived its killed parent"
        finally:
            await holder.close()
    finally:
        await asyncio.to_thread(drop_postgres_database, url)


async def test_a_row_keyed_by_a_blob_is_a_break_not_an_endless_walk(sqlite_url: str) -> None:
    """SQLite sorts a BLOB after every text; a row written by hand with a BLOB key is named (it once made the paging
    ask for the same row forever), in one process and in parts."""
    database = create_database(make_settings(database_url=sqlite_url))
    try:
        await upgrade(database)
        for n in range(6):
            await Repositories(database).trades.save_trade(make_trade(trade_id=f"T-{n}"))
        await tamper(sqlite_url, "UPDATE trades SET trade_id = x'41' WHERE trade_id = 'T-3'")
        for jobs in (1, 3):
            report = await asyncio.wait_for(verify(database, chunk=2, jobs=jobs, parallel_from=0), 60)
            assert report.broken is not None and "is not text but bytes b'A'" in report.broken.problem, jobs
    finally:
        await database.dispose()


async def test_with_one_instance_the_parts_cut_that_instances_rows(seeded: Database, database_url: str) -> None:
    """``--instance`` in parts: the keys are cut among that instance's rows, so a small instance in a large database
    starts no child, and its parts hold about as many of its rows each."""
    await trades_of_another_instance(database_url, "bot-big", [f"A-{n:02d}" for n in range(40)])
    bounds: list[dict[str, tuple[str | None, str | None]]] = []
    start = RowsWorker.start

    async def counted(*args: Any) -> RowsWorker:
        bounds.append(args[3])
        return await start(*args)

    mine = seeded.settings.instance_id
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RowsWorker, "start", counted)
        report = await verify(seeded, instance_id=mine, jobs=3, parallel_from=35)  # 34 rows of its own: under 35
        assert report.ok and report.rows["trades"] == 31 and bounds == []
        report = await verify(seeded, instance_id=mine, jobs=3, parallel_from=0)
    assert report.ok and report.rows["trades"] == 31
    # Its 31 trades, cut in two near the middle of its own keys (T-AUDITED, T-00 … T-29), not of bot-big's A-…
    assert bounds[0]["trades"][1] is not None and bounds[0]["trades"][1].startswith("T-")
