"""The committer on real databases: a batch in, an outcome out; bad records isolated and kept, the rest committed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc

from persistence.db.engine import Database
from persistence.records.models import Record
from persistence.tables.repositories import Repositories
from persistence.write.backlog import Pending
from persistence.write.committer import DEAD_LETTER_FILE, Committer, RetryPolicy
from persistence.write.faults import classify
from tests.support.factories import make_trade

NO_WAIT = RetryPolicy(attempts=1, initial_wait=0.0, max_wait=0.0)


async def no_sleep(_: float) -> None:
    return None


def pending(records: list[Record]) -> list[Pending]:
    return [Pending(seq, record, None, None, None) for seq, record in enumerate(records, start=1)]


@pytest.fixture
def committer(database: Database, tmp_path: Path) -> Committer:
    return Committer(database, Repositories(database), retry=NO_WAIT, sleep=no_sleep, dead_letter_dir=tmp_path / "j")


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_nul_that_postgresql_refuses_everywhere_is_kept_in_the_dead_letter_file_and_the_rest_commit(
    committer: Committer, repos: Repositories, tmp_path: Path
) -> None:
    # Validation refuses NUL up front; a record that got past it (an older release's journal) must not stop writing.
    bad = make_trade().model_copy(update={"trade_id": "ORD\x00NUL"})
    good = [make_trade() for _ in range(4)]
    outcome = await committer.commit(pending([good[0], good[1], bad, good[2], good[3]]))
    assert outcome.failure is None
    assert [item.record for item in outcome.committed] == good
    [dead] = outcome.dead
    assert dead.item.record is bad and dead.kept_in == "file" and dead.error_class == "DBAPIError"
    assert "0x00" in dead.error
    [line] = (tmp_path / "j" / DEAD_LETTER_FILE).read_bytes().splitlines()
    kept = json.loads(line[9:])
    assert kept["key"] == "ORD\x00NUL" and kept["data"]["trade_id"] == "ORD\x00NUL"
    assert sorted(trade.trade_id for trade in await repos.trades.get_recent_trades(10)) == sorted(
        trade.trade_id for trade in good
    )


async def test_a_clean_batch_commits_every_record_in_order(committer: Committer, repos: Repositories) -> None:
    trades = [make_trade() for _ in range(10)]
    outcome = await committer.commit(pending(list(trades)))
    assert outcome.failure is None and not outcome.dead and outcome.handled == 10
    assert [item.record for item in outcome.committed] == trades


def test_an_encoding_refusal_is_a_data_error_whatever_wraps_it() -> None:
    refusal = UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
    assert classify(sa_exc.StatementError("bind failed", "INSERT", {}, refusal)) == "data"
    wrapped = RuntimeError("driver failed")
    wrapped.__cause__ = refusal
    assert classify(wrapped) == "data"
    assert classify(RuntimeError("something else")) == "transient"
