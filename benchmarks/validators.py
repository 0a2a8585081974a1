"""A msgspec ``Struct`` with the trade's fields, types and lengths: the compiled-validator baseline of the benchmarks.

It checks less than :meth:`persistence.records.models.Trade.parse` (no eight-place check, no quantizing, no conversion
to UTC, no NUL or surrogate check, no normalising of case), so it is the floor a compiled validator starts from, not a
drop-in replacement.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class MsgspecTrade(msgspec.Struct, forbid_unknown_fields=True):  # type: ignore[call-arg, unused-ignore]
    trade_id: Identifier
    symbol: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    direction: Literal["BUY", "SELL"]
    entry_time: datetime
    entry_price: Decimal
    position_size: Decimal
    signal_id: Identifier | None = None
    account_id: Identifier | None = None
    exit_time: datetime | None = None
    exit_price: Decimal | None = None
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    pnl: Decimal | None = None
    pnl_percentage: Decimal | None = None
    session: Literal["TOKYO", "LONDON", "NY", "SYDNEY", "OVERLAP"] | None = None
    pattern_type: Identifier | None = None
    confidence_score: Decimal | None = None
    risk_reward_ratio: Decimal | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
