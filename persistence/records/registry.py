"""The one list of record types, and every name each one goes by.

A record type is known by several names, each fixed by what already uses it: its ``entity`` (``snapshot``: audit
entries, dead letters, events and metrics), its export name (``snapshots``: the ``export`` command and the repositories'
exports), its journal kind (``snapshot``: the tag of each journal entry on disk, which old journals must still replay),
and its table (``performance_snapshots``). This module states them once, per :class:`RecordKind`, with the natural key,
the time column the history is filtered on, the order an export streams in, and the rule by which a new version
replaces a stored one. Every other place (audit trail, verify, export, copy, journal, repositories, command line)
reads :data:`RECORD_KINDS` instead of listing the four types again.

Tables are SQL, so they are not named here: :data:`persistence.db.schema.TABLE_OF` maps each entity to its table,
and a test holds that mapping, the tables and the latest migration to this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from persistence.records.models import (
    Entity,
    ParameterChange,
    PerformanceSnapshot,
    Record,
    Signal,
    SignalExecution,
    Trade,
)

__all__ = [
    "BY_ENTITY",
    "BY_EXPORT_NAME",
    "JOURNAL_KINDS",
    "JOURNAL_MODELS",
    "RECORD_KINDS",
    "RecordKind",
    "Replaces",
    "newer_trade",
    "signal_replaces",
]

Replaces = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
"""``replaces(new, stored)``: whether the version ``new`` may overwrite ``stored`` (two rows of one natural key)."""


def newer_trade(new: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    """A trade's rule: the version updated last wins (a replay of an older one never undoes a close)."""
    return bool(stored["updated_at"] <= new["updated_at"])


def signal_replaces(new: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    """A signal's rule: a replay of the unexecuted version never undoes a recorded execution."""
    return bool(not stored["executed"] or new["executed"])


@dataclass(frozen=True, slots=True)
class RecordKind:
    """One record type and every name it goes by."""

    model: type[Record]
    """The pydantic model: the one statement of the fields (and of ``entity`` and ``key_field``)."""
    export_name: str
    """What ``export`` and the command line call it (``trades``, ``signals``, ``snapshots``, ``parameters``)."""
    journal_kind: str
    """The ``kind`` of its journal entries on disk."""
    time_column: str
    """The time its history is filtered on (``start_date`` and ``end_date``)."""
    sort_columns: tuple[str, ...]
    """The columns an export streams in order of (``id``: the table's insertion order)."""
    filters: tuple[str, ...]
    """The fields its exported history may be filtered on by value, besides its time and ``instance_id``."""
    replaces: Replaces | None = None
    """How a new version replaces a stored one; ``None``: the first version is kept (an append-only record)."""
    changes: Mapping[str, type[Record]] = field(default_factory=dict)
    """Other journal kinds, each a change to a stored record of this type (a signal's execution update)."""

    @property
    def entity(self) -> Entity:
        """The record's entity name (``trade``, ``signal``, ``snapshot``, ``parameter_change``)."""
        return self.model.entity

    @property
    def natural_key(self) -> tuple[str, ...]:
        """The fields that identify a record in its table."""
        return (self.model.key_field,)


RECORD_KINDS: tuple[RecordKind, ...] = (
    RecordKind(
        Trade,
        export_name="trades",
        journal_kind="trade",
        time_column="entry_time",
        sort_columns=("id",),
        filters=("symbol", "session", "pattern_type"),
        replaces=newer_trade,
    ),
    RecordKind(
        Signal,
        export_name="signals",
        journal_kind="signal",
        time_column="generated_at",
        sort_columns=("id",),
        filters=("symbol", "executed"),
        replaces=signal_replaces,
        changes=MappingProxyType({"signal_execution": SignalExecution}),
    ),
    RecordKind(
        PerformanceSnapshot,
        export_name="snapshots",
        journal_kind="snapshot",
        time_column="snapshot_time",
        sort_columns=("snapshot_time", "id"),
        filters=("session",),
    ),
    RecordKind(
        ParameterChange,
        export_name="parameters",
        journal_kind="parameter_change",
        time_column="change_time",
        sort_columns=("change_time", "id"),
        filters=("session",),
    ),
)
"""Every record type, in the order a batch writes them."""

BY_ENTITY: Mapping[Entity, RecordKind] = MappingProxyType({kind.entity: kind for kind in RECORD_KINDS})
"""Each record type by its entity name."""
BY_EXPORT_NAME: Mapping[str, RecordKind] = MappingProxyType({kind.export_name: kind for kind in RECORD_KINDS})
"""Each record type by its export name."""
JOURNAL_MODELS: Mapping[str, type[Record]] = MappingProxyType(
    {
        **{kind.journal_kind: kind.model for kind in RECORD_KINDS},
        **{name: model for kind in RECORD_KINDS for name, model in kind.changes.items()},
    }
)
"""The model of each journal kind: what a journal entry's ``kind`` is parsed as."""
JOURNAL_KINDS: Mapping[type[Record], str] = MappingProxyType({model: name for name, model in JOURNAL_MODELS.items()})
"""The journal kind of each model."""
