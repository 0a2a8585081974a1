"""The versioned write rule against a reference model: random versions of a few trades, in random batches.

For any sequence of versions (older, newer, identical, interleaved keys) cut into any batches, the stored rows and
the audit trail are what applying the versions one at a time under the rule gives: a trade's newest ``updated_at``
wins, an identical or older version writes nothing, and each version written is one entry, in order.
"""

from __future__ import annotations

import asyncio
import tempfile
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persistence.audit.verify import verify
from persistence.db.engine import create_database
from persistence.migrations import upgrade
from persistence.records.models import Trade
from persistence.tables.repositories import Repositories
from tests.support.databases import examples, make_settings
from tests.support.factories import BASE_TIME, make_trade

KEYS = ("T-A", "T-B", "T-C")
BASES = {key: make_trade(trade_id=key, entry_time=BASE_TIME, pnl=None) for key in KEYS}

versions = st.lists(
    st.tuples(st.sampled_from(KEYS), st.integers(0, 4), st.sampled_from(("1.5", "-2.25", "0"))),
    min_size=1,
    max_size=12,
)


def version(key: str, step: int, pnl: str) -> Trade:
    base = BASES[key]
    return base.model_copy(
        update={"updated_at": base.updated_at + timedelta(seconds=step), "pnl": Decimal(pnl).quantize(Decimal("1e-8"))}
    )


def reference(records: list[Trade]) -> tuple[dict[str, Trade], list[tuple[str, object, object]]]:
    stored: dict[str, Trade] = {}
    written: list[tuple[str, object, object]] = []
    for record in records:
        kept = stored.get(record.trade_id)
        if kept is not None:
            if kept.updated_at > record.updated_at:
                continue
            record = record.model_copy(update={"created_at": kept.created_at})
            if record == kept:
                continue
        stored[record.trade_id] = record
        written.append((record.trade_id, record.updated_at, record.pnl))
    return stored, written


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=versions, cuts=st.lists(st.integers(1, 12), min_size=1, max_size=6))
def test_stored_rows_and_the_trail_are_the_reference_models(steps: list[tuple[str, int, str]], cuts: list[int]) -> None:
    records = [version(*step) for step in steps]
    batches: list[list[Trade]] = []
    start = 0
    for size in cuts * 12:
        if start >= len(records):
            break
        batches.append(records[start : start + size])
        start += size
    expected_rows, expected_entries = reference(records)

    async def run(path: Path) -> None:
        database = create_database(make_settings(database_url=f"sqlite+aiosqlite:///{path}"))
        try:
            await upgrade(database)
            repos = Repositories(database)
            for batch in batches:
                async with database.write() as connection:
                    await repos.trades.upsert(connection, batch)
            for key in KEYS:
                assert await repos.trades.get_trade_by_id(key) == expected_rows.get(key)
            entries = [entry for key in KEYS for entry in await repos.audit.versions("trade", key)]
            entries.sort(key=lambda entry: entry.seq)
            got = [(entry.natural_key, entry.version["updated_at"], entry.version["pnl"]) for entry in entries]
            want = [(key, f"{at:%Y-%m-%dT%H:%M:%S.%f}Z", f"{pnl:.8f}") for key, at, pnl in expected_entries]
            assert got == want
            assert (await verify(database)).ok
        finally:
            await database.dispose()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run(Path(directory) / "model.db"))
