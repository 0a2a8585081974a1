"""PostgreSQL transactions begun ahead: the next batch's rows claimed while the batch before it commits.

Real PostgreSQL throughout: what another connection sees while a transaction is held, whether the held one is the
one that commits (its ids drawn once), that it is rolled back and its keys freed whenever it is not taken, and that
the batches' trail verifies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from persistence.audit.chain import canonical_version
from persistence.audit.verify import verify
from persistence.db.engine import Database, create_database
from persistence.migrations import upgrade
from persistence.records.models import Record, SignalExecution, Trade
from persistence.tables.ahead import Held
from persistence.tables.repositories import Repositories, batch_parts
from persistence.testing import PoisonRecords, WriteFaults
from persistence.write.backlog import Pending
from persistence.write.committer import Committer, RetryPolicy
from tests.support.audit import closed_version
from tests.support.databases import (
    create_postgres_database,
    drop_postgres_database,
    empty_every_table,
    make_settings,
)
from tests.support.factories import make_parameter_change, make_signal, make_snapshot, make_trade

pytestmark = pytest.mark.postgres

BATCH = 40  # above COPY_MIN_ROWS: the claims go by COPY


@pytest.fixture
async def repos(postgres_url: str) -> AsyncIterator[Repositories]:
    database = create_database(make_settings(database_url=postgres_url, query_timeout_ms=5000))
    await upgrade(database)
    async with database.write() as connection:
        await empty_every_table(connection)
    try:
        yield Repositories(database)
    finally:
        await database.dispose()


def pending(records: Sequence[Record]) -> list[Pending]:
    return [Pending(seq, record, None, None, None) for seq, record in enumerate(records)]


async def write(repos: Repositories, records: Sequence[Record]) -> None:
    await repos.write_batch(*batch_parts(records), unknown_signal="unknown")


async def idle_in_transaction(database: Database) -> int:
    """Connections of this database holding a transaction open and doing nothing: a held transaction."""
    async with database.read() as connection:
        result = await connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
            )
        )
        return int(result.scalar_one())


async def last_id(database: Database) -> int:
    async with database.read() as connection:
        result = await connection.execute(text("SELECT last_value FROM trades_id_seq"))
        return int(result.scalar_one())


async def stored_ids(database: Database, records: Sequence[Trade]) -> list[int]:
    async with database.read() as connection:
        result = await connection.execute(
            text("SELECT id FROM trades WHERE trade_id = ANY(:keys) ORDER BY id"),
            {"keys": [record.trade_id for record in records]},
        )
        return [int(value) for value in result.scalars()]


async def fail_entry_once(database: Database, natural_key: str) -> None:
    """The first audit entry of ``natural_key`` fails like a serialization failure (SQLSTATE 40001, transient), after
    its batch's rows are written; later ones pass (the count is a sequence: a rollback does not take it back)."""
    async with database.write() as connection:
        await connection.execute(text("CREATE SEQUENCE IF NOT EXISTS fail_entry_count"))
        await connection.execute(
            text(
                "CREATE OR REPLACE FUNCTION fail_entry_once() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.natural_key = '{natural_key}' AND nextval('fail_entry_count') = 1 THEN "
                "RAISE EXCEPTION 'injected once' USING ERRCODE = '40001'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        await connection.execute(text("DROP TRIGGER IF EXISTS fail_entry_once ON audit_log"))
        await connection.execute(
            text(
                "CREATE TRIGGER fail_entry_once BEFORE INSERT ON audit_log FOR EACH ROW "
                "EXECUTE FUNCTION fail_entry_once()"
            )
        )


async def drop_fail_entry_once(database: Database) -> None:
    async with database.write() as connection:
        await connection.execute(text("DROP TRIGGER IF EXISTS fail_entry_once ON audit_log"))
        await connection.execute(text("DROP FUNCTION IF EXISTS fail_entry_once()"))
        await connection.execute(text("DROP SEQUENCE IF EXISTS fail_entry_count"))


async def insert_within(url: str, trade_id: str, seconds: float) -> None:
    """Insert a row with ``trade_id`` from a connection of its own, failing if a lock holds it past ``seconds``."""
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await connection.execute(f"SET lock_timeout = '{int(seconds * 1000)}ms'")
        async with connection.transaction():
            await connection.execute(
                "INSERT INTO trades (trade_id, signal_id, account_id, symbol, direction, entry_time, entry_price, "
                "stop_loss, take_profit, position_size, session, pattern_type, created_at, updated_at) "
                "VALUES ($1, 'S', 'A', 'EURUSD', 'BUY', now(), 1, 1, 1, 1, 'LONDON', 'p', now(), now())",
                trade_id,
            )
            raise asyncio.CancelledError  # roll back: only whether it could take the key matters
    except asyncio.CancelledError:
        pass
    finally:
        await connection.close()


async def test_the_batch_begun_ahead_is_the_transaction_that_commits_it_and_its_trail_verifies(
    repos: Repositories,
) -> None:
    database = repos.database
    first = [make_trade() for _ in range(BATCH)]
    opened = [make_trade(exit_time=None, pnl=None) for _ in range(BATCH)]
    closed = closed_version(opened[3])
    signals = [make_signal() for _ in range(BATCH)]
    executed = SignalExecution.parse(
        {"signal_id": signals[5].signal_id, "executed": True, "execution_status": "FILLED"}
    )
    nxt: list[Record] = [*opened, closed, *signals, executed, make_snapshot(), make_parameter_change()]

    begun = repos.begin_ahead(nxt, first)
    assert begun is not None
    await write(repos, first)
    held = await begun
    assert isinstance(held, Held)
    drawn = await last_id(database)
    # Held, not committed: another connection sees none of it, and the transaction waits open.
    assert await repos.trades.count() == BATCH
    assert await repos.signals.get_signal_by_id(signals[0].signal_id) is None
    assert await idle_in_transaction(database) == 1

    await write(repos, nxt)
    assert await idle_in_transaction(database) == 0
    # Its rows are those the held transaction claimed: their ids were drawn before it continued, not again.
    assert max(await stored_ids(database, opened)) <= drawn
    for trade in [*first, *opened[:3], closed, *opened[4:]]:
        assert await repos.trades.get_trade_by_id(trade.trade_id) == trade
    stored = await repos.signals.get_signal_by_id(signals[5].signal_id)
    assert stored is not None and stored.executed and stored.execution_status == "FILLED"
    fields = tuple(Trade.model_fields)
    versions = await repos.audit.versions("trade", opened[3].trade_id)
    assert [entry.payload for entry in versions] == [
        canonical_version(version.__dict__, fields) for version in (opened[3], closed)
    ]
    assert len(await repos.audit.versions("signal", signals[5].signal_id)) == 2
    assert (await verify(database)).ok


async def test_nothing_is_begun_ahead_of_a_batch_that_shares_a_key_with_the_committing_one(
    repos: Repositories,
) -> None:
    committing = [make_trade() for _ in range(BATCH)]
    assert repos.begin_ahead([make_trade(), closed_version(committing[7])], committing) is None
    signal = make_signal()
    execution = SignalExecution.parse({"signal_id": signal.signal_id, "executed": True})
    assert repos.begin_ahead([make_trade(), execution], [signal]) is None
    assert repos.begin_ahead([], committing) is None


async def test_a_transaction_begun_for_other_records_is_rolled_back_and_frees_their_keys(
    repos: Repositories, postgres_url: str
) -> None:
    database = repos.database
    first, nxt, other = ([make_trade() for _ in range(BATCH)] for _ in range(3))
    begun = repos.begin_ahead(nxt, first)
    assert begun is not None
    await write(repos, first)
    assert isinstance(await begun, Held)
    await write(repos, other)  # not the records begun ahead: that transaction is rolled back
    assert await idle_in_transaction(database) == 0
    assert await repos.trades.count() == 2 * BATCH
    await insert_within(postgres_url, nxt[0].trade_id, 2.0)  # its key is free: no lock left behind
    await asyncio.wait_for(write(repos, nxt), 10)
    assert await repos.trades.count() == 3 * BATCH
    assert (await verify(database)).ok


async def test_a_failed_attempt_of_the_committing_batch_gives_up_the_batch_begun_ahead_of_it(
    repos: Repositories,
) -> None:
    """The committing batch fails after its rows are written (the batch after it has begun claiming): that batch is
    given up, so the retry runs alone and the later batch takes its ids after it."""
    database = repos.database
    first, nxt = [make_trade() for _ in range(BATCH)], [make_trade() for _ in range(BATCH)]
    await fail_entry_once(database, first[0].trade_id)
    try:
        begun = repos.begin_ahead(nxt, first)
        assert begun is not None
        with pytest.raises(DBAPIError, match="injected once"):
            await write(repos, first)
        await asyncio.wait({begun})
        await write(repos, first)  # the retry
        await write(repos, nxt)
    finally:
        await drop_fail_entry_once(database)
    assert await idle_in_transaction(database) == 0
    assert min(await stored_ids(database, nxt)) > max(await stored_ids(database, first))
    assert await repos.trades.count() == 2 * BATCH
    assert (await verify(database)).ok


async def test_discarding_rolls_back_a_held_transaction_and_cancels_one_still_waiting(
    repos: Repositories, postgres_url: str
) -> None:
    database = repos.database
    first, nxt = [make_trade() for _ in range(BATCH)], [make_trade() for _ in range(BATCH)]
    waiting = repos.begin_ahead(nxt, first)  # the committing batch never writes: it waits for its rows forever
    assert waiting is not None
    await asyncio.wait_for(repos.discard_ahead(), 5)
    assert waiting.cancelled()

    begun = repos.begin_ahead(nxt, first)
    assert begun is not None
    await write(repos, first)
    assert isinstance(await begun, Held)
    assert await idle_in_transaction(database) == 1
    await repos.discard_ahead()
    assert await idle_in_transaction(database) == 0
    assert await repos.trades.count() == BATCH
    await insert_within(postgres_url, nxt[-1].trade_id, 2.0)


async def test_a_commit_not_wholly_handled_rolls_back_what_was_begun_after_it_and_close_rolls_back_the_rest(
    repos: Repositories, tmp_path: Path
) -> None:
    """Through the committer, as the writer drives it: when a commit fails after its rows are written (the batch
    after it claiming meanwhile), nothing is held once it returns; at close, neither is anything begun since."""
    database = repos.database

    async def no_sleep(_seconds: float) -> None:
        return None

    committer = Committer(
        database, repos, retry=RetryPolicy(attempts=1), sleep=no_sleep, dead_letter_dir=tmp_path / "letters"
    )
    items = pending([make_trade() for _ in range(2 * BATCH)])
    first, nxt = items[:BATCH], items[BATCH:]
    await fail_entry_once(database, first[0].record.key)
    try:
        ahead = asyncio.ensure_future(committer.prepare_ahead(nxt, first))
        outcome = await committer.commit(first)
        assert outcome.failure is not None and outcome.handled == 0
        assert await idle_in_transaction(database) == 0
        await ahead

        ahead = asyncio.ensure_future(committer.prepare_ahead(nxt, first))
        assert (await committer.commit(first)).handled == BATCH
        await ahead
        assert await idle_in_transaction(database) == 1
        await committer.close()  # the sidecar stops before the next batch is committed
        assert await idle_in_transaction(database) == 0
        assert await repos.trades.count() == BATCH
    finally:
        await drop_fail_entry_once(database)


async def test_nothing_is_begun_ahead_while_a_fault_of_the_kit_is_installed(repos: Repositories) -> None:
    """Every batch's statements must meet the kit's faults: none is begun ahead while one is installed, and one held
    from before is rolled back rather than continued (its claims never met the fault)."""
    database = repos.database
    first, nxt = [make_trade() for _ in range(BATCH)], [make_trade() for _ in range(BATCH)]
    with WriteFaults(database, 0):
        assert repos.begin_ahead(nxt, first) is None
    begun = repos.begin_ahead(nxt, first)
    assert begun is not None
    await write(repos, first)
    assert isinstance(await begun, Held)
    with PoisonRecords(database, {nxt[5].trade_id}), pytest.raises(DBAPIError):
        await write(repos, nxt)
    assert await idle_in_transaction(database) == 0
    assert await repos.trades.count() == BATCH
    assert database.faults_installed == 0


async def test_a_server_default_of_repeatable_read_still_chains_the_batch_begun_ahead_after_the_one_before() -> None:
    """Under REPEATABLE READ a transaction begun before the batch before it committed would read the chain's head
    as it was then; the held transaction reads at READ COMMITTED whatever the server's default."""
    url = await asyncio.to_thread(create_postgres_database, "persistence_rr")
    try:
        admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            name = await admin.fetchval("SELECT current_database()")
            await admin.execute(f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'")
        finally:
            await admin.close()
        database = create_database(make_settings(database_url=url, query_timeout_ms=5000))
        try:
            await upgrade(database)
            repos = Repositories(database)
            first, nxt = [make_trade() for _ in range(BATCH)], [make_trade() for _ in range(BATCH)]
            begun = repos.begin_ahead(nxt, first)
            assert begun is not None
            await write(repos, first)
            assert isinstance(await begun, Held)
            await write(repos, nxt)
            assert await repos.trades.count() == 2 * BATCH
            assert (await verify(database)).ok
        finally:
            await database.dispose()
    finally:
        await asyncio.to_thread(drop_postgres_database, url)


async def test_a_poisoned_record_begun_ahead_is_dead_lettered_by_the_batch_that_meets_it(
    repos: Repositories, tmp_path: Path
) -> None:
    """A row the server refuses fails the claim made ahead (nothing is held); the batch's own transaction meets the
    refusal, isolates the record, and commits the rest."""
    database = repos.database
    async with database.write() as connection:
        await connection.execute(
            text(
                "CREATE OR REPLACE FUNCTION refuse_ahead() RETURNS trigger AS $$ BEGIN "
                "IF NEW.trade_id = 'REFUSED-AHEAD' THEN RAISE EXCEPTION 'refused' USING ERRCODE = '23514'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        await connection.execute(text("DROP TRIGGER IF EXISTS refuse_ahead ON trades"))
        await connection.execute(
            text("CREATE TRIGGER refuse_ahead BEFORE INSERT ON trades FOR EACH ROW EXECUTE FUNCTION refuse_ahead()")
        )
    try:

        async def no_sleep(_seconds: float) -> None:
            return None

        committer = Committer(database, repos, retry=RetryPolicy(), sleep=no_sleep, dead_letter_dir=tmp_path)
        first = pending([make_trade() for _ in range(BATCH)])
        nxt = pending([*(make_trade() for _ in range(BATCH - 1)), make_trade(trade_id="REFUSED-AHEAD")])
        ahead = asyncio.ensure_future(committer.prepare_ahead(nxt, first))
        assert (await committer.commit(first)).handled == BATCH
        await ahead
        outcome = await committer.commit(nxt)
        assert len(outcome.committed) == BATCH - 1
        assert [dead.item.record.key for dead in outcome.dead] == ["REFUSED-AHEAD"]
        assert await idle_in_transaction(database) == 0
        assert await repos.trades.count() == 2 * BATCH - 1
        assert (await verify(database)).ok
    finally:
        async with database.write() as connection:
            await connection.execute(text("DROP TRIGGER IF EXISTS refuse_ahead ON trades"))


async def test_a_pool_of_one_connection_begins_nothing_ahead_and_still_starts(postgres_url: str) -> None:
    """A second transaction would wait for the pool's only connection, held by the first: nothing is begun, and the
    start-up's opening of a second connection is skipped (it would wait for the pool's timeout)."""
    database = create_database(
        make_settings(database_url=postgres_url, query_timeout_ms=5000, pool_size=1, max_overflow=0)
    )
    try:
        await upgrade(database)
        repos = Repositories(database)
        await asyncio.wait_for(repos.warm_connections(), 5)
        assert repos.begin_ahead([make_trade() for _ in range(BATCH)], [make_trade()]) is None
        await write(repos, [make_trade() for _ in range(BATCH)])
    finally:
        await database.dispose()


async def test_a_cancelled_continuation_raises_the_cancellation_and_gives_its_connection_back(
    repos: Repositories, postgres_url: str
) -> None:
    """A stop cancels the writer while it continues a held transaction (here waiting for the chain lock, which another
    session holds): the cancellation comes out as itself, not as an error of the connection it leaves behind (which
    the committer would retry, running past the stop's timeout)."""
    from persistence.audit.trail import chain_lock_key

    database = repos.database
    first, nxt = [make_trade() for _ in range(BATCH)], [make_trade() for _ in range(BATCH)]
    begun = repos.begin_ahead(nxt, first)
    assert begun is not None
    await write(repos, first)
    assert isinstance(await begun, Held)
    other = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await other.execute("BEGIN")
        await other.execute("SELECT pg_advisory_xact_lock($1)", chain_lock_key(database.settings.instance_id))
        continuing = asyncio.ensure_future(write(repos, nxt))
        await asyncio.sleep(0.3)  # waiting on the server for the chain lock
        continuing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await continuing
    finally:
        await other.close()
    await repos.discard_ahead()
    assert database.engine.sync_engine.pool.checkedout() == 0
    assert await idle_in_transaction(database) == 0
    assert await repos.trades.count() == BATCH


async def prepared_statements(database: Database) -> dict[int, int]:
    """How many statements each of the pool's two connections has prepared (its backend pid → count); the count's
    own statement is prepared by the first call and is the same one after."""
    counts: dict[int, int] = {}
    async with database.engine.connect() as one, database.engine.connect() as two:
        for connection in (one, two):
            row = (
                await connection.exec_driver_sql("SELECT pg_backend_pid(), count(*) FROM pg_prepared_statements")
            ).one()
            counts[int(row[0])] = int(row[1])
            await connection.rollback()
    return counts


async def test_the_connections_warmed_at_start_prepare_nothing_in_the_first_batches(postgres_url: str) -> None:
    """At start the writer's two connections are sent a batch's statements (warm_connections). The first batches
    after it, one of them begun ahead on the other connection, prepare nothing more on either: without the warm-up
    they prepared nine statements, 5-10 ms of the first burst after a start."""
    database = create_database(
        make_settings(database_url=postgres_url, query_timeout_ms=5000, pool_size=2, max_overflow=0)
    )
    try:
        await upgrade(database)
        async with database.write() as connection:
            await empty_every_table(connection)
        repos = Repositories(database)
        await repos.warm_connections()
        before = await prepared_statements(database)
        first = [make_trade() for _ in range(BATCH)]
        nxt: list[Record] = [*(make_trade() for _ in range(BATCH)), *(make_signal() for _ in range(BATCH))]
        begun = repos.begin_ahead(nxt, first)
        assert begun is not None
        await write(repos, first)
        assert isinstance(await begun, Held)
        await write(repos, nxt)
        after = await prepared_statements(database)
        assert len(after) == 2 and after == before
        assert await repos.trades.count() == 2 * BATCH  # read last: its own statement is prepared on a connection
    finally:
        await database.dispose()


@pytest.mark.parametrize("held", ["table", "chain"])
async def test_warming_at_start_does_not_wait_for_a_lock_another_session_holds(postgres_url: str, held: str) -> None:
    """Another session holds a lock the warm-up's statements need (a SHARE lock on trades, as a plain CREATE INDEX
    takes; or this instance's chain lock): the warm-up gives up on it at once instead of waiting for the query
    timeout (30 s here), and a batch written after the lock is gone goes through."""
    from persistence.audit.trail import chain_lock_key

    database = create_database(make_settings(database_url=postgres_url, query_timeout_ms=30_000))
    try:
        await upgrade(database)
        repos = Repositories(database)
        other = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
        try:
            await other.execute("BEGIN")
            if held == "table":
                await other.execute("LOCK TABLE trades IN SHARE MODE")
            else:
                await other.execute("SELECT pg_advisory_xact_lock($1)", chain_lock_key(database.settings.instance_id))
            await asyncio.wait_for(repos.warm_connections(), 5)
            assert await idle_in_transaction(database) == 1  # only the other session: the warm-up rolled back
        finally:
            await other.execute("ROLLBACK")
            await other.close()
        await write(repos, [make_trade() for _ in range(BATCH)])
        assert await repos.trades.count() >= BATCH
    finally:
        await database.dispose()
