"""The write path's pure policies, without a database: the spill policy, the version rule, the outcome -> breaker
mapping, and which prefix of a batch an outcome has handled."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from persistence.tables.repositories import AMENDMENT_RULES
from persistence.tables.versioned import never, winning_version
from persistence.write.backlog import Batch, Pending, spill_due_in, spill_over
from persistence.write.breaker import Admission, BreakerState, CircuitBreaker, Verdict, verdict_of
from persistence.write.committer import DeadLetteredRecord, Outcome
from persistence.write.writer import handled_prefix
from tests.support.factories import make_trade

# ---------------------------------------------------------------------------------------------- the spill policy

NOW = 1000.0
GRACE = 0.5


def due(**overrides: Any) -> float | None:
    values: dict[str, Any] = {
        "now": NOW,
        "oldest_unjournaled": NOW,
        "unjournaled": 1,
        "in_ram": 1,
        "max_pending": 100,
        "last_progress": NOW - 10.0,
        "grace": GRACE,
    }
    values.update(overrides)
    return spill_due_in(**values)


def test_nothing_unjournaled_is_never_due() -> None:
    assert due(unjournaled=0, in_ram=50) is None
    assert due(unjournaled=0, in_ram=500) is None  # over the bound, but all journaled already


def test_ram_over_its_bound_is_due_at_once() -> None:
    assert due(in_ram=101, unjournaled=1, last_progress=NOW) == 0.0


def test_a_record_is_due_once_it_is_a_grace_period_old() -> None:
    assert due(oldest_unjournaled=NOW) == pytest.approx(GRACE)
    assert due(oldest_unjournaled=NOW - 0.2) == pytest.approx(GRACE - 0.2)
    assert due(oldest_unjournaled=NOW - 5.0) == 0.0  # overdue is now, never negative


def test_while_commits_go_through_nothing_is_due() -> None:
    # The oldest record is long overdue, but the writer made progress just now: records are on their way.
    assert due(oldest_unjournaled=NOW - 5.0, last_progress=NOW) == pytest.approx(GRACE)
    assert due(oldest_unjournaled=NOW - 5.0, last_progress=NOW - 0.4) == pytest.approx(0.1)


def test_a_record_of_unknown_age_counts_as_recorded_now() -> None:
    assert due(oldest_unjournaled=None) == pytest.approx(GRACE)


def test_over_the_bound_ram_spills_down_to_three_quarters_of_it() -> None:
    assert spill_over(100, 100) == 0
    assert spill_over(101, 100) == 26
    assert spill_over(400, 100) == 325
    assert spill_over(5, 0) == 5  # a bound of nothing: everything goes


# ---------------------------------------------------------------------------------------------- the version rule

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def trade_row(updated: int, *, pnl: str = "1", created: int = 0) -> dict[str, Any]:
    return {
        "trade_id": "T-1",
        "pnl": pnl,
        "updated_at": T0 + timedelta(seconds=updated),
        "created_at": T0 + timedelta(seconds=created),
    }


def signal_row(executed: bool, *, status: str | None = None) -> dict[str, Any]:
    return {"signal_id": "S-1", "executed": executed, "execution_status": status, "created_at": T0}


NEWER_TRADE = AMENDMENT_RULES["trades"]
SIGNAL = AMENDMENT_RULES["signals"]


def test_a_newer_trade_version_wins_and_keeps_the_stored_created_at() -> None:
    stored = trade_row(1, created=0)
    new = trade_row(2, pnl="5", created=7)
    assert winning_version(new, stored, NEWER_TRADE) == {**new, "created_at": stored["created_at"]}


def test_an_older_trade_version_never_overwrites_a_newer_one() -> None:
    assert winning_version(trade_row(1, pnl="9"), trade_row(2), NEWER_TRADE) is None


def test_a_version_identical_to_the_stored_row_writes_nothing() -> None:
    assert winning_version(trade_row(2), trade_row(2), NEWER_TRADE) is None
    # Only its created_at differs: the stored one is kept, so nothing changes.
    assert winning_version(trade_row(2, created=9), trade_row(2), NEWER_TRADE) is None


def test_a_version_of_the_same_time_with_other_values_wins() -> None:
    assert winning_version(trade_row(2, pnl="3"), trade_row(2), NEWER_TRADE) == trade_row(2, pnl="3")


def test_an_executed_signal_is_never_reset_by_a_replay_of_its_unexecuted_version() -> None:
    executed = signal_row(True, status="FILLED")
    assert winning_version(signal_row(False), executed, SIGNAL) is None
    assert winning_version(signal_row(True, status="PARTIAL"), executed, SIGNAL) == signal_row(True, status="PARTIAL")
    assert winning_version(executed, signal_row(False), SIGNAL) == executed


def test_immutable_records_keep_their_first_version() -> None:
    assert winning_version(trade_row(9, pnl="9"), trade_row(1), never) is None


# ---------------------------------------------------------------------------------------------- outcome -> breaker


def pending(key: str) -> Pending:
    return Pending(1, make_trade(trade_id=key), None, None, None)


def test_the_verdict_of_each_outcome() -> None:
    assert verdict_of(failed=False, data_errors=False) is Verdict.SUCCESS
    assert verdict_of(failed=True, data_errors=False) is Verdict.FAILURE
    assert verdict_of(failed=True, data_errors=True) is Verdict.FAILURE  # a failure counts whatever else happened
    assert verdict_of(failed=False, data_errors=True) is Verdict.NEITHER


def test_an_outcome_says_its_verdict() -> None:
    item = pending("T-1")
    assert Outcome(committed=[item]).verdict is Verdict.SUCCESS
    assert Outcome().verdict is Verdict.SUCCESS
    assert Outcome(failure=OSError("disk I/O error")).verdict is Verdict.FAILURE
    assert Outcome(dead=[DeadLetteredRecord(item, "IntegrityError", "x")]).verdict is Verdict.NEITHER
    assert Outcome(lost=[(item, "nowhere")]).verdict is Verdict.NEITHER


def admitted(breaker: CircuitBreaker) -> Admission:
    admission, _ = breaker.admit(NOW)
    assert admission.allowed
    return admission


def test_the_breaker_takes_a_verdict() -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_seconds=30.0)
    assert breaker.record(admitted(breaker), Verdict.FAILURE, NOW) is None
    assert breaker.record(admitted(breaker), Verdict.NEITHER, NOW) is None  # data errors: no change
    assert breaker.consecutive_failures == 1
    transition = breaker.record(admitted(breaker), Verdict.FAILURE, NOW)
    assert transition is not None and transition.to_state is BreakerState.OPEN
    probe, _ = breaker.admit(NOW + 30.0)
    assert probe.probe
    closed = breaker.record(probe, Verdict.SUCCESS, NOW + 30.0)
    assert closed is not None and closed.to_state is BreakerState.CLOSED and breaker.consecutive_failures == 0


def test_a_probe_with_only_data_errors_frees_the_probe_slot() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=30.0)
    breaker.record(admitted(breaker), Verdict.FAILURE, NOW)
    probe, _ = breaker.admit(NOW + 30.0)
    assert breaker.record(probe, Verdict.NEITHER, NOW + 30.0) is None
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit(NOW + 30.0)[0].probe  # another probe may go


# ---------------------------------------------------------------------------------------------- the handled prefix


def test_the_handled_prefix_stops_at_the_first_record_left_waiting() -> None:
    a, b, c = pending("A"), pending("B"), pending("C")
    batch = Batch([a, None, b, c], False, [None] * 4)
    assert handled_prefix(batch, Outcome(committed=[a, b, c])) == 4
    assert handled_prefix(batch, Outcome(committed=[a], failure=OSError("x"))) == 2  # the unreadable line goes too
    assert handled_prefix(batch, Outcome(dead=[DeadLetteredRecord(a, "E", "x")], lost=[(b, "y")])) == 3
    assert handled_prefix(batch, Outcome(failure=OSError("x"))) == 0
    assert handled_prefix(Batch([a, b], False, [None, None]), Outcome(committed=[a, b])) == 2
