"""Record builders shared by the tests: valid defaults, any field overridable."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from persistence.records.models import ParameterChange, PerformanceSnapshot, Signal, Trade

BASE_TIME = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
_counter = itertools.count(1)


def trade_data(**overrides: Any) -> dict[str, Any]:
    n = next(_counter)
    data: dict[str, Any] = {
        "trade_id": f"T-{n:06d}",
        "symbol": "EURUSD",
        "direction": "BUY",
        "entry_time": BASE_TIME + timedelta(minutes=n),
        "entry_price": Decimal("1.08423000"),
        "position_size": Decimal("100000"),
        "session": "LONDON",
        "pattern_type": "breakout",
    }
    data.update(overrides)
    return data


def make_trade(**overrides: Any) -> Trade:
    return Trade.parse(trade_data(**overrides))


def make_signal(**overrides: Any) -> Signal:
    n = next(_counter)
    data: dict[str, Any] = {
        "signal_id": f"S-{n:06d}",
        "symbol": "EURUSD",
        "timeframe": "M5",
        "signal_type": "SELL",
        "confidence": Decimal("0.82"),
        "entry_price": Decimal("1.08400000"),
        "generated_at": BASE_TIME + timedelta(minutes=n),
        "session": "NY",
    }
    data.update(overrides)
    return Signal.parse(data)


def make_snapshot(**overrides: Any) -> PerformanceSnapshot:
    data: dict[str, Any] = {
        "snapshot_time": BASE_TIME,
        "total_trades": 10,
        "winning_trades": 6,
        "losing_trades": 4,
        "win_rate": Decimal("0.6"),
        "total_pnl": Decimal("-125.5"),
        "session": "TOKYO",
        "parameter_mode": "conservative",
    }
    data.update(overrides)
    return PerformanceSnapshot.parse(data)


def make_parameter_change(**overrides: Any) -> ParameterChange:
    data: dict[str, Any] = {
        "change_time": BASE_TIME,
        "parameter_mode": "aggressive",
        "changed_by": "learning_agent",
        "confidence_threshold": Decimal("0.75"),
        "min_risk_reward": Decimal("1.5"),
        "reason": "win rate above target for 3 sessions",
    }
    data.update(overrides)
    return ParameterChange.parse(data)
