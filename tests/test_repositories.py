"""Repository contract: the same suite on SQLite and, when its URL is given, PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from persistence.db.engine import Database
from persistence.db.schema import trades
from persistence.errors import InvalidQueryError
from persistence.records.models import SignalExecution
from persistence.tables.queries import TRADE_SORT_COLUMNS, SignalQuery, TradeQuery
from persistence.tables.repositories import Repositories
from tests.support.factories import BASE_TIME, make_parameter_change, make_signal, make_snapshot, make_trade

EXACT_VALUES = [
    Decimal("98765.12345678"),
    Decimal("0.00001234"),
    Decimal("0.00000001"),
    Decimal("-0.00000001"),
    Decimal("-12345.6789"),
    Decimal("9999999999.99999999"),
    Decimal("-9999999999.99999999"),
    Decimal("0"),
    Decimal("1.10000000"),
]


async def test_values_round_trip_digit_for_digit(repos: Repositories) -> None:
    recorded = [make_trade(pnl=value, pnl_percentage=value, exit_price=abs(value) or None) for value in EXACT_VALUES]
    for trade in recorded:
        await repos.trades.save_trade(trade)
    for trade in recorded:
        stored = await repos.trades.get_trade_by_id(trade.trade_id)
        assert stored is not None
        assert str(stored.pnl) == str(trade.pnl)
        assert str(stored.pnl_percentage) == str(trade.pnl_percentage)
        assert stored == trade


async def test_big_prices_and_sizes_fit(repos: Repositories) -> None:
    trade = make_trade(entry_price=Decimal("98765.12345678"), position_size=Decimal("2500000.5"))
    await repos.trades.save_trade(trade)
    stored = await repos.trades.get_trade_by_id(trade.trade_id)
    assert stored is not None
    assert (stored.entry_price, stored.position_size) == (Decimal("98765.12345678"), Decimal("2500000.50000000"))


async def test_timestamps_come_back_aware_in_utc(repos: Repositories) -> None:
    trade = make_trade(entry_time="2026-05-01T17:45:30.123456+03:00")
    await repos.trades.save_trade(trade)
    stored = await repos.trades.get_trade_by_id(trade.trade_id)
    assert stored is not None
    assert stored.entry_time == trade.entry_time
    assert stored.entry_time.utcoffset() == timedelta(0)
    assert stored.entry_time.hour == 14 and stored.entry_time.microsecond == 123456


async def test_sorting_by_pnl_is_numeric_negatives_included(repos: Repositories) -> None:
    values = ["-100", "-20.5", "-3", "-0.00000001", "0", "0.00000001", "2", "10", "100.25", "1000"]
    for value in reversed(values):
        await repos.trades.save_trade(make_trade(pnl=Decimal(value), symbol="XAUUSD"))
    ascending = await repos.trades.query(symbol="XAUUSD", sort_by="pnl", sort_order="asc")
    assert [t.pnl for t in ascending.items] == [Decimal(v) for v in values]
    descending = await repos.trades.query(symbol="XAUUSD", sort_by="pnl", sort_order="desc")
    assert [t.pnl for t in descending.items] == [Decimal(v) for v in reversed(values)]


async def test_range_filter_on_money_is_numeric(database: Database, repos: Repositories) -> None:
    for value in ["-50", "-5", "5", "50", "500"]:
        await repos.trades.save_trade(make_trade(pnl=Decimal(value), symbol="GBPJPY"))
    async with database.read() as connection:
        rows = await connection.execute(
            select(trades.c.pnl)
            .where(trades.c.pnl > Decimal("-10"), trades.c.symbol == "GBPJPY")
            .order_by(trades.c.pnl)
        )
        assert [row.pnl for row in rows] == [Decimal("-5"), Decimal("5"), Decimal("50"), Decimal("500")]


async def test_upsert_updates_in_place_and_never_creates_a_second_row(database: Database, repos: Repositories) -> None:
    opened = make_trade()
    closed = opened.model_copy(
        update={
            "exit_price": Decimal("1.09000000"),
            "exit_time": opened.entry_time + timedelta(hours=1),
            "pnl": Decimal("57.70"),
            "updated_at": opened.updated_at + timedelta(seconds=5),
        }
    )
    async with database.write() as connection:
        await repos.trades.upsert(connection, [opened, closed, opened])  # a replay of the older version, too
    assert await repos.trades.count() == 1
    stored = await repos.trades.get_trade_by_id(opened.trade_id)
    assert stored is not None and stored.pnl == Decimal("57.70") and stored.exit_price == Decimal("1.09")
    assert stored.created_at == opened.created_at


async def test_an_older_version_replayed_later_never_overwrites_a_newer_one(repos: Repositories) -> None:
    newer = make_trade(pnl=Decimal("10"))
    older = newer.model_copy(update={"pnl": Decimal("-99"), "updated_at": newer.updated_at - timedelta(seconds=1)})
    await repos.trades.save_trade(newer)
    await repos.trades.save_trade(older)
    stored = await repos.trades.get_trade_by_id(newer.trade_id)
    assert stored is not None and stored.pnl == Decimal("10")
    assert await repos.trades.count() == 1


async def test_a_batch_is_one_transaction(database: Database, repos: Repositories) -> None:
    good = make_trade()
    with pytest.raises(Exception, match="boom"):
        async with database.write() as connection:
            await repos.trades.upsert(connection, [good])
            raise RuntimeError("boom")
    assert await repos.trades.get_trade_by_id(good.trade_id) is None


async def test_check_constraints_hold_in_the_database_itself(database: Database) -> None:
    row = make_trade().to_row()
    for column, value in [("direction", "LONG"), ("session", "MARS")]:
        with pytest.raises(IntegrityError):
            async with database.write() as connection:
                await connection.execute(insert(trades), [{**row, column: value}])
    with pytest.raises(IntegrityError):
        async with database.write() as connection:
            await connection.execute(insert(trades), [row, {**row}])  # unique trade_id


async def test_recent_trades_newest_first_with_limit(repos: Repositories) -> None:
    made = [make_trade(entry_time=BASE_TIME + timedelta(hours=i)) for i in range(5)]
    for trade in made:
        await repos.trades.save_trade(trade)
    recent = await repos.trades.get_recent_trades(limit=3)
    assert [t.trade_id for t in recent] == [t.trade_id for t in reversed(made)][:3]


async def test_trades_by_session_and_pattern_with_date_range(repos: Repositories) -> None:
    day = [BASE_TIME + timedelta(days=i) for i in range(4)]
    tokyo = [make_trade(session="TOKYO", pattern_type="flag", entry_time=t) for t in day]
    await repos.trades.save_trade(make_trade(session="NY", pattern_type="wedge", entry_time=day[1]))
    for trade in tokyo:
        await repos.trades.save_trade(trade)
    in_session = await repos.trades.get_trades_by_session("tokyo", start_date=day[1], end_date=day[2])
    assert [t.trade_id for t in in_session] == [tokyo[1].trade_id, tokyo[2].trade_id]
    by_pattern = await repos.trades.get_trades_by_pattern("flag", start_date=day[2])
    assert [t.trade_id for t in by_pattern] == [tokyo[2].trade_id, tokyo[3].trade_id]
    assert await repos.trades.get_trades_by_pattern("wedge") != []


async def test_query_filters_paginate_and_count(repos: Repositories) -> None:
    for i in range(12):
        await repos.trades.save_trade(
            make_trade(
                symbol="EURUSD" if i % 2 else "USDJPY",
                session="LONDON" if i % 3 else "SYDNEY",
                entry_time=BASE_TIME + timedelta(minutes=i),
            )
        )
    page = await repos.trades.query(
        symbol="EURUSD", limit=4, offset=0, sort_by="entry_time", sort_order="asc", with_total=True
    )
    rest = await repos.trades.query(symbol="EURUSD", limit=4, offset=4, sort_by="entry_time", sort_order="asc")
    assert page.total == 6 and len(page.items) == 4 and len(rest.items) == 2
    assert {t.trade_id for t in page.items}.isdisjoint({t.trade_id for t in rest.items})
    times = [t.entry_time for t in page.items + rest.items]
    assert times == sorted(times)
    sydney = await repos.trades.query(session="sydney", with_total=True)
    assert sydney.total == 4 and all(t.session == "SYDNEY" for t in sydney.items)
    window = await repos.trades.query(
        start_date=BASE_TIME + timedelta(minutes=3), end_date=BASE_TIME + timedelta(minutes=5)
    )
    assert len(window.items) == 3


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"sort_by": "pnl; DROP TABLE trades"}, "sort_by"),
        ({"sort_by": "id"}, "sort_by"),
        ({"sort_order": "sideways"}, "sort_order"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"offset": -1}, "offset"),
        ({"session": "MOON"}, "session"),
        ({"start_date": BASE_TIME, "end_date": BASE_TIME - timedelta(days=1)}, "start_date"),
    ],
)
async def test_query_refuses_bad_parameters_before_any_sql(
    repos: Repositories, kwargs: dict[str, object], parameter: str
) -> None:
    await repos.trades.save_trade(make_trade())
    with pytest.raises(InvalidQueryError) as caught:
        await repos.trades.query(**kwargs)  # type: ignore[arg-type]
    assert caught.value.parameter == parameter
    assert await repos.trades.count() == 1


# An aware time whose UTC equivalent falls past either end of the calendar (years 1-9999).
PAST_THE_CALENDAR = (
    datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5))),
    datetime(1, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=5))),
)


@pytest.mark.parametrize("moment", PAST_THE_CALENDAR, ids=["after-9999", "before-0001"])
def test_a_query_date_outside_the_calendar_is_an_invalid_query_error_naming_it(moment: datetime) -> None:
    for query, parameter in ((TradeQuery, "start_date"), (SignalQuery, "end_date"), (TradeQuery, "end_date")):
        with pytest.raises(InvalidQueryError) as caught:
            query(**{parameter: moment})
        assert caught.value.parameter == parameter
        assert "outside the range of dates" in caught.value.reason


@pytest.mark.parametrize("moment", PAST_THE_CALENDAR, ids=["after-9999", "before-0001"])
async def test_the_single_purpose_reads_refuse_a_date_outside_the_calendar_the_same_way(
    repos: Repositories, moment: datetime
) -> None:
    with pytest.raises(InvalidQueryError) as caught:
        await repos.trades.get_trades_by_pattern("breakout", start_date=moment)
    assert caught.value.parameter == "start_date"
    with pytest.raises(InvalidQueryError) as caught:
        await repos.snapshots.get_snapshots(end_date=moment)
    assert caught.value.parameter == "end_date"


async def test_every_whitelisted_sort_column_works(repos: Repositories) -> None:
    await repos.trades.save_trade(make_trade(pnl=Decimal("1")))
    await repos.trades.save_trade(make_trade())
    for column in TRADE_SORT_COLUMNS:
        for order in ("asc", "desc"):
            page = await repos.trades.query(sort_by=column, sort_order=order)  # type: ignore[arg-type]
            assert len(page.items) == 2


async def test_latest_trades_for_history_are_oldest_first(repos: Repositories) -> None:
    made = [make_trade() for _ in range(6)]
    for trade in made:
        await repos.trades.save_trade(trade)
    latest = await repos.trades.get_latest_trades(4)
    assert [t.trade_id for t in latest] == [t.trade_id for t in made[2:]]


async def test_latest_trades_with_the_same_updated_at_come_in_insertion_order(repos: Repositories) -> None:
    stamp = BASE_TIME + timedelta(days=1)
    made = [make_trade(trade_id=f"TIE-{n}", updated_at=stamp, created_at=stamp) for n in (3, 1, 2, 0)]
    for trade in made:
        await repos.trades.save_trade(trade)
    await repos.trades.save_trade(make_trade(trade_id="NEWER", updated_at=stamp + timedelta(seconds=1)))
    latest = await repos.trades.get_latest_trades(3)
    assert [t.trade_id for t in latest] == ["TIE-2", "TIE-0", "NEWER"]


async def test_signals_save_update_and_query(database: Database, repos: Repositories) -> None:
    first, second = make_signal(), make_signal(symbol="BTCUSD", entry_price=Decimal("98765.12345678"))
    await repos.signals.save_signal(first)
    await repos.signals.save_signal(second)
    assert await repos.signals.update_signal_execution(first.signal_id, True, "FILLED") is True
    assert await repos.signals.update_signal_execution("S-unknown", True, "FILLED") is False
    executed = await repos.signals.get_signals_by_status(True)
    assert [s.signal_id for s in executed] == [first.signal_id]
    assert executed[0].execution_status == "FILLED"
    pending = await repos.signals.get_signals_by_status(False)
    assert [s.signal_id for s in pending] == [second.signal_id]
    assert pending[0].entry_price == Decimal("98765.12345678")
    recent = await repos.signals.get_recent_signals(limit=10)
    assert [s.signal_id for s in recent] == [second.signal_id, first.signal_id]
    page = await repos.signals.query(executed=False, symbol="BTCUSD", with_total=True)
    assert page.total == 1


async def test_a_replayed_unexecuted_signal_never_undoes_its_execution(database: Database, repos: Repositories) -> None:
    signal = make_signal()
    await repos.signals.save_signal(signal)
    async with database.write() as connection:
        missing = await repos.signals.apply_executions(
            connection, [SignalExecution(signal_id=signal.signal_id, executed=True, execution_status="FILLED")]
        )
    assert missing == []
    await repos.signals.save_signal(signal)  # replay of the original version
    stored = await repos.signals.get_signal_by_id(signal.signal_id)
    assert stored is not None and stored.executed is True and stored.execution_status == "FILLED"
    page = await repos.signals.query(with_total=True)
    assert page.total == 1


async def test_snapshots_and_parameter_changes_are_idempotent_on_replay(
    database: Database, repos: Repositories
) -> None:
    snapshot = make_snapshot(total_pnl=Decimal("-0.00000001"))
    change = make_parameter_change()
    for _ in range(2):
        async with database.write() as connection:
            await repos.snapshots.insert(connection, [snapshot])
            await repos.parameters.insert(connection, [change])
    assert await repos.snapshots.get_snapshots() == [snapshot]
    assert await repos.parameters.get_changes() == [change]
    await repos.snapshots.save_snapshot(make_snapshot(snapshot_time=BASE_TIME + timedelta(hours=1), session="LONDON"))
    assert len(await repos.snapshots.get_snapshots(session="london")) == 1
    assert len(await repos.snapshots.get_snapshots(start_date=BASE_TIME + timedelta(minutes=1))) == 1
    counts = await repos.table_counts()
    assert counts["performance_snapshots"] == 2 and counts["parameter_history"] == 1


async def test_dead_letters_keep_the_payload_and_error(repos: Repositories) -> None:
    trade = make_trade(pnl=Decimal("-1.5"))
    await repos.dead_letters.add(trade, ValueError("value out of range"))
    [letter] = await repos.dead_letters.list()
    assert (letter.entity, letter.natural_key, letter.error_class) == ("trade", trade.trade_id, "ValueError")
    assert letter.error == "value out of range"
    assert letter.payload["pnl"] == "-1.50000000"
    assert letter.created_at.utcoffset() == timedelta(0)
    assert await repos.dead_letters.count() == 1


async def test_a_record_dead_lettered_again_is_kept_once_and_another_version_is_kept_too(repos: Repositories) -> None:
    """A replay (a stop or a crash between the dead letter's commit and the journal's acknowledgement) dead-letters
    the same record again: it is kept once. Another version of the same trade is another dead letter."""
    trade = make_trade(pnl=Decimal("-1.5"))
    await repos.dead_letters.add(trade, ValueError("value out of range"))
    await repos.dead_letters.add(trade, ValueError("value out of range, again"))
    assert await repos.dead_letters.count() == 1
    await repos.dead_letters.add(trade.model_copy(update={"pnl": Decimal("-2.5")}), ValueError("value out of range"))
    assert await repos.dead_letters.count() == 2


async def test_the_table_survives_an_injection_attempt_in_sort_by(database: Database, repos: Repositories) -> None:
    await repos.trades.save_trade(make_trade())
    with pytest.raises(InvalidQueryError):
        await repos.trades.query(sort_by="entry_time; DELETE FROM trades")
    async with database.read() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM trades"))).scalar_one() == 1


async def test_the_sqlite_batch_fast_path_stores_exactly_what_the_column_types_store(sqlite_url: str) -> None:
    import sqlite3

    from persistence.config import Settings
    from persistence.db.engine import create_database
    from persistence.migrations import upgrade

    database = create_database(Settings(_env_file=None, database_url=sqlite_url))
    try:
        await upgrade(database)
        repos = Repositories(database)
        fast = make_trade(trade_id="via-fast-path", pnl=Decimal("-0.00000001"), exit_price=Decimal("98765.12345678"))
        typed = fast.model_copy(update={"trade_id": "via-column-types"})
        async with database.write() as connection:
            await repos.trades.upsert(connection, [fast])
            await connection.execute(insert(trades), [{**typed.to_row(), "instance_id": repos.audit.instance_id}])
        assert await repos.trades.get_trade_by_id("via-fast-path") == fast
        assert await repos.trades.get_trade_by_id("via-column-types") == typed
    finally:
        await database.dispose()
    with sqlite3.connect(sqlite_url.split(":///", 1)[1]) as connection:
        rows = connection.execute("SELECT * FROM trades ORDER BY id").fetchall()
    assert rows[0][2:] == rows[1][2:]  # every stored value identical but id and trade_id
    assert isinstance(rows[0][rows[0].index(-1)], int)


async def test_the_sqlite_row_reader_reads_exactly_what_the_column_types_read(sqlite_url: str) -> None:
    from persistence.config import Settings
    from persistence.db.engine import create_database
    from persistence.db.schema import signals
    from persistence.migrations import upgrade
    from persistence.records.models import Signal, Trade

    database = create_database(Settings(_env_file=None, database_url=sqlite_url))
    try:
        await upgrade(database)
        repos = Repositories(database)
        stored_trades = [
            make_trade(
                pnl=Decimal("-0.00000001"),
                exit_price=Decimal("98765.12345678"),
                entry_time=BASE_TIME,  # the factory's default moves on with every trade any test made
                exit_time=BASE_TIME + timedelta(days=30),
            ),
            make_trade(pnl=None, session=None, stop_loss=None, confidence_score=Decimal("0")),
            make_trade(pnl=Decimal("9999999999.99999999"), position_size=Decimal("0.00000001")),
        ]
        stored_signals = [make_signal(executed=True, execution_status="filled"), make_signal(session=None)]
        async with database.write() as connection:
            await repos.trades.upsert(connection, stored_trades)
            await repos.signals.upsert(connection, stored_signals)
        async with database.read() as connection:
            fields = [c for c in trades.c if c.name not in ("id", "instance_id")]
            rows = (await connection.execute(select(*fields))).mappings()
            typed_trades = [Trade(**row) for row in rows]
            fields = [c for c in signals.c if c.name not in ("id", "instance_id")]
            rows = (await connection.execute(select(*fields))).mappings()
            typed_signals = [Signal(**row) for row in rows]
        fast_trades = (await repos.trades.query(sort_by="trade_id", sort_order="asc")).items
        fast_signals = (await repos.signals.query(sort_by="signal_id", sort_order="asc")).items
    finally:
        await database.dispose()
    typed_trades.sort(key=lambda trade: trade.trade_id)
    typed_signals.sort(key=lambda signal: signal.signal_id)
    assert fast_trades == typed_trades
    assert fast_signals == typed_signals
    # Equal is not enough for decimals: the digits (the exponent) must match too, and booleans must be booleans.
    assert [trade.to_json() for trade in fast_trades] == [trade.to_json() for trade in typed_trades]
    assert [type(signal.executed) for signal in fast_signals] == [bool, bool]


def test_decoded_decimals_are_shared_and_the_cache_stays_bounded() -> None:
    from persistence.db import columns

    first = columns.decode_decimal(-123_456_789)
    assert str(first) == "-1.23456789"
    assert columns.decode_decimal(-123_456_789) is first
    for value in range(columns._DECIMAL_CACHE_SIZE + 10):
        columns.decode_decimal(value)
    assert len(columns._decimals) <= columns._DECIMAL_CACHE_SIZE
    assert columns.decode_decimal(-123_456_789) == first


# --------------------------------------------------------------------------- batch writes (COPY on PostgreSQL)

BATCH = 40  # above COPY_MIN_ROWS, so PostgreSQL takes the COPY path


async def test_a_large_batch_upsert_lands_every_row_exactly(repos: Repositories) -> None:
    from persistence.db.pgcopy import COPY_MIN_ROWS

    assert BATCH >= COPY_MIN_ROWS
    from sqlalchemy import event

    batch = [make_trade(pnl=EXACT_VALUES[i % len(EXACT_VALUES)], exit_time=None) for i in range(BATCH)]
    sent: list[str] = []

    def capture(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        sent.append(statement)

    event.listen(repos.database.engine.sync_engine, "before_cursor_execute", capture)
    async with repos.database.write() as connection:
        await repos.trades.upsert(connection, batch)
    event.remove(repos.database.engine.sync_engine, "before_cursor_execute", capture)
    if repos.database.dialect_name == "postgresql":  # the rows went by COPY: SQLAlchemy saw only reads and locks
        assert [statement for statement in sent if statement.split()[0] != "SELECT"] == []
    for trade in batch:
        assert await repos.trades.get_trade_by_id(trade.trade_id) == trade
    assert await repos.trades.count() == BATCH


async def test_a_large_batch_of_new_rows_takes_its_ids_in_the_order_recorded(repos: Repositories) -> None:
    """Claims go in key order on PostgreSQL (and by COPY); the surrogate ids still follow the batch's order."""
    batch = [make_trade(trade_id=f"ORDER-{n:03d}") for n in reversed(range(BATCH))]
    async with repos.database.write() as connection:
        await repos.trades.upsert(connection, batch)
        stored = (await connection.execute(select(trades.c.trade_id).order_by(trades.c.id))).scalars().all()
    assert stored == [trade.trade_id for trade in batch]


async def test_claims_and_overwrites_staged_on_one_connection_keep_their_own_columns(database_url: str) -> None:
    """On PostgreSQL a batch's claims and its overwrites may both go through a temporary stage, the claims' with the
    drawn ids: whichever comes first on a connection must not decide the other's columns. One connection throughout."""
    from persistence.db.engine import create_database
    from persistence.migrations import upgrade
    from tests.support.audit import closed_version
    from tests.support.databases import empty_every_table, make_settings

    database = create_database(make_settings(database_url=database_url, pool_size=1, max_overflow=0))
    try:
        await upgrade(database)
        if database.dialect_name == "postgresql":
            async with database.write() as connection:
                await empty_every_table(connection)
        repos = Repositories(database)
        opened = [make_trade(exit_time=None, pnl=None) for _ in range(BATCH)]
        closed = [closed_version(trade) for trade in opened]
        await repos.write_batch([*opened, *closed], [], [], [], [], unknown_signal="none")  # overwrites staged first
        stored = make_trade(exit_time=None, pnl=None)
        await repos.write_batch([stored], [], [], [], [], unknown_signal="none")
        fresh = [make_trade() for _ in range(BATCH)]
        # the claims staged now: one key is stored
        await repos.write_batch([*fresh, closed_version(stored)], [], [], [], [], unknown_signal="none")
        assert await repos.trades.count() == 2 * BATCH + 1
        assert await repos.trades.get_trade_by_id(stored.trade_id) == closed_version(stored)
    finally:
        await database.dispose()


async def test_a_large_batch_never_lets_an_older_version_overwrite_a_newer_one(repos: Repositories) -> None:
    originals = [make_trade(updated_at=BASE_TIME + timedelta(hours=1)) for _ in range(BATCH)]
    async with repos.database.write() as connection:
        await repos.trades.upsert(connection, originals)
    older = [t.model_copy(update={"pnl": Decimal("-1"), "updated_at": BASE_TIME}) for t in originals[::2]]
    newer = [
        t.model_copy(update={"pnl": Decimal("2"), "updated_at": BASE_TIME + timedelta(hours=2)})
        for t in originals[1::2]
    ]
    async with repos.database.write() as connection:
        await repos.trades.upsert(connection, [*older, *newer])
    for trade in originals[::2]:
        assert await repos.trades.get_trade_by_id(trade.trade_id) == trade
    for trade in newer:
        assert await repos.trades.get_trade_by_id(trade.trade_id) == trade
    assert await repos.trades.count() == BATCH


async def test_versions_of_one_trade_in_one_batch_end_as_if_applied_in_order(repos: Repositories) -> None:
    base = make_trade(created_at=BASE_TIME, updated_at=BASE_TIME)
    later = base.model_copy(
        update={
            "pnl": Decimal("5"),
            "created_at": BASE_TIME + timedelta(1),
            "updated_at": BASE_TIME + timedelta(hours=3),
        }
    )
    stale = base.model_copy(update={"pnl": Decimal("-5"), "updated_at": BASE_TIME + timedelta(hours=1)})
    filler = [make_trade() for _ in range(BATCH)]
    async with repos.database.write() as connection:
        await repos.trades.upsert(connection, [base, *filler, later, stale])
    stored = await repos.trades.get_trade_by_id(base.trade_id)
    assert stored is not None
    assert stored.pnl == Decimal("5")  # the newest version wins, whatever its place in the batch
    assert stored.created_at == BASE_TIME  # the first version's, as an update never sets created_at


async def test_a_large_signal_batch_never_undoes_an_execution(repos: Repositories) -> None:
    executed = [make_signal(executed=True, execution_status="filled") for _ in range(BATCH)]
    async with repos.database.write() as connection:
        await repos.signals.upsert(connection, executed)
    replay = [signal.model_copy(update={"executed": False, "execution_status": None}) for signal in executed]
    async with repos.database.write() as connection:
        await repos.signals.upsert(connection, replay)
    for signal in executed:
        stored = await repos.signals.get_signal_by_id(signal.signal_id)
        assert stored is not None and stored.executed is True and stored.execution_status == "filled"


async def test_two_large_batches_in_one_transaction_and_a_replay_of_append_only_records(repos: Repositories) -> None:
    first = [make_snapshot() for _ in range(BATCH)]
    second = [make_parameter_change() for _ in range(BATCH)]
    async with repos.database.write() as connection:
        await repos.snapshots.insert(connection, first)
        await repos.snapshots.insert(connection, first[:20])  # a replay in the same transaction: skipped
        await repos.parameters.insert(connection, second)
        await repos.trades.upsert(connection, [make_trade() for _ in range(BATCH)])
        await repos.trades.upsert(connection, [make_trade() for _ in range(BATCH)])
    counts = await repos.table_counts()
    assert (counts["performance_snapshots"], counts["parameter_history"], counts["trades"]) == (BATCH, BATCH, 2 * BATCH)


async def test_a_later_tables_conflict_takes_back_only_its_own_copy(repos: Repositories) -> None:
    """On PostgreSQL each table's batch of new keys goes by a ``COPY`` under a savepoint that stays open to the
    commit; a later table's copy that meets a stored key goes back to its own savepoint, never to an earlier one."""
    stored = make_signal()
    await repos.signals.save_signal(stored)
    new_trades = [make_trade() for _ in range(BATCH)]
    signals = [make_signal() for _ in range(BATCH)]
    signals[BATCH // 2] = stored.model_copy(update={"executed": True, "execution_status": "filled"})
    written = await repos.write_batch(new_trades, signals, [], [], [], unknown_signal="none")
    assert written.unknown == []
    assert await repos.trades.count() == BATCH
    for trade in new_trades:
        assert await repos.trades.get_trade_by_id(trade.trade_id) == trade
    for signal in signals:
        assert await repos.signals.get_signal_by_id(signal.signal_id) == signal
    assert len(await repos.audit.versions("trade", new_trades[0].trade_id)) == 1
    assert len(await repos.audit.versions("signal", stored.signal_id)) == 2


def test_a_batch_is_grouped_by_kind_in_order_and_a_subclass_goes_with_its_base() -> None:
    from persistence.records.models import Trade
    from persistence.tables.repositories import batch_parts

    class HostTrade(Trade):  # a host's own subclass: Trade.parse hands it through as it is
        pass

    own = HostTrade.model_validate(make_trade().model_dump())
    first, signal, second = make_trade(), make_signal(), make_trade()
    execution = SignalExecution.parse({"signal_id": signal.signal_id, "executed": True})
    snapshot, change = make_snapshot(), make_parameter_change()
    parts = batch_parts([first, change, signal, own, execution, snapshot, second])
    assert [list(group) for group in parts] == [[first, own, second], [signal], [execution], [snapshot], [change]]


async def test_nothing_is_begun_ahead_on_sqlite(tmp_path: Path) -> None:
    """SQLite's write lock holds the whole database: no second transaction begins while one commits (PostgreSQL's
    transactions begun ahead: tests/test_ahead.py)."""
    from persistence.db.engine import create_database
    from tests.support.databases import make_settings

    database = create_database(make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'ahead.db'}"))
    try:
        repos = Repositories(database)
        assert repos.begin_ahead([make_trade() for _ in range(BATCH)], [make_trade()]) is None
        await repos.discard_ahead()  # nothing held: nothing to do
    finally:
        await database.dispose()


async def test_a_large_batch_rolls_back_with_its_transaction(repos: Repositories) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with repos.database.write() as connection:
            await repos.trades.upsert(connection, [make_trade() for _ in range(BATCH)])
            raise Abort
    assert await repos.trades.count() == 0


async def test_a_row_the_database_refuses_in_a_large_batch_is_a_data_error(repos: Repositories) -> None:
    from persistence.records.models import Trade
    from persistence.write.faults import classify

    good = [make_trade() for _ in range(BATCH)]
    # Built without validation, as no caller of the public API can: the table's CHECK refuses it.
    bad = Trade.model_construct(**{**good[0].__dict__, "trade_id": "refused", "position_size": Decimal("-1")})
    with pytest.raises(DBAPIError) as caught:
        async with repos.database.write() as connection:
            await repos.trades.upsert(connection, [*good[1:], bad])
    assert classify(caught.value) == "data"
    assert await repos.trades.count() == 0


@pytest.mark.postgres
async def test_a_large_batch_held_up_by_a_lock_times_out_as_a_transient_error(postgres_url: str) -> None:
    from persistence.config import Settings
    from persistence.db.engine import create_database
    from persistence.errors import QueryTimeoutError
    from persistence.migrations import upgrade
    from persistence.testing import DatabaseLock
    from persistence.write.faults import classify

    database = create_database(Settings(_env_file=None, database_url=postgres_url, query_timeout_ms=300))
    try:
        await upgrade(database)
        repos = Repositories(database)
        for attempt in range(2):  # the first time the stage is made while locked out; then it exists already
            async with DatabaseLock(postgres_url):
                with pytest.raises(QueryTimeoutError) as caught:
                    async with database.write() as connection:
                        await repos.trades.upsert(connection, [make_trade() for _ in range(BATCH)])
            assert classify(caught.value) == "transient", attempt
            if attempt == 0:  # make the stage exist on the pooled connection for the second attempt
                async with database.write() as connection:
                    await repos.trades.upsert(connection, [make_trade() for _ in range(BATCH)])
    finally:
        await database.dispose()


async def test_a_record_from_a_row_mapping_equals_the_one_the_row_reader_makes(repos: Repositories) -> None:
    from persistence.records.models import Trade

    trade = make_trade(pnl=Decimal("-0.00000001"))
    await repos.trades.save_trade(trade)
    async with repos.database.read() as connection:
        row = (await connection.execute(select(*[c for c in trades.c if c.name != "id"]))).mappings().one()
    assert Trade.from_row(row) == await repos.trades.get_trade_by_id(trade.trade_id) == trade
