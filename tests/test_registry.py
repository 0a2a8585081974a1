"""The record registry: every name a record type goes by, stated once, and the tables and migrations held to it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Boolean, String, Table, UniqueConstraint, inspect

from persistence.app.cli.main import build_parser
from persistence.audit.verify import _AUDITED
from persistence.db.columns import ExactNumeric, UTCDateTime
from persistence.db.engine import create_database
from persistence.db.schema import RECORD_TABLES, TABLE_OF
from persistence.migrations import upgrade
from persistence.records.models import ENTITIES, Record
from persistence.records.parser import FieldRule, rules_of
from persistence.records.registry import BY_ENTITY, BY_EXPORT_NAME, JOURNAL_KINDS, JOURNAL_MODELS, RECORD_KINDS
from persistence.tables.repositories import AMENDMENT_RULES
from persistence.tools.copy import NATURAL_KEYS
from persistence.tools.export import EXPORTABLES
from persistence.write.backlog import KINDS, MODELS
from tests.support.databases import make_settings

COLUMN_TYPES: dict[str, type[Any]] = {
    "text": String,
    "choice": String,
    "decimal": ExactNumeric,
    "time": UTCDateTime,
    "integer": BigInteger,
    "flag": Boolean,
}


def test_the_registry_names_every_entity_once_in_order() -> None:
    assert tuple(kind.entity for kind in RECORD_KINDS) == ENTITIES
    assert len(BY_EXPORT_NAME) == len(RECORD_KINDS)
    assert len(JOURNAL_MODELS) == len(JOURNAL_KINDS)  # no two models share a journal kind
    for kind in RECORD_KINDS:
        assert kind.natural_key == (kind.model.key_field,)
        assert all(model.entity == kind.entity for model in kind.changes.values())


def test_the_names_on_disk_and_on_the_command_line_are_the_ones_existing_journals_and_scripts_use() -> None:
    # Journals written by earlier versions tag entries with these kinds; they must still replay.
    assert {name: model.__name__ for name, model in JOURNAL_MODELS.items()} == {
        "trade": "Trade",
        "signal": "Signal",
        "signal_execution": "SignalExecution",
        "snapshot": "PerformanceSnapshot",
        "parameter_change": "ParameterChange",
    }
    assert {kind.entity: kind.export_name for kind in RECORD_KINDS} == {
        "trade": "trades",
        "signal": "signals",
        "snapshot": "snapshots",
        "parameter_change": "parameters",
    }
    assert {kind.entity: TABLE_OF[kind.entity].name for kind in RECORD_KINDS} == {
        "trade": "trades",
        "signal": "signals",
        "snapshot": "performance_snapshots",
        "parameter_change": "parameter_history",
    }


def test_every_other_list_of_record_types_is_read_from_the_registry() -> None:
    assert set(TABLE_OF) == set(BY_ENTITY)
    assert tuple(TABLE_OF[kind.entity] for kind in RECORD_KINDS) == RECORD_TABLES
    assert (KINDS, MODELS) == (JOURNAL_KINDS, JOURNAL_MODELS)
    assert [(table, model) for table, model in _AUDITED] == [(TABLE_OF[k.entity], k.model) for k in RECORD_KINDS]
    assert list(EXPORTABLES) == [*BY_EXPORT_NAME, "audit"]
    for kind in RECORD_KINDS:
        spec = EXPORTABLES[kind.export_name]
        assert (spec.table, spec.order_by) == (TABLE_OF[kind.entity], kind.sort_columns)
        assert set(spec.filters) == {"start_date", "end_date", "instance_id", *kind.filters}
        assert spec.filters["start_date"] == (kind.time_column, "from")
        assert NATURAL_KEYS[TABLE_OF[kind.entity].name] == kind.natural_key
        assert AMENDMENT_RULES.get(TABLE_OF[kind.entity].name) is kind.replaces
    exporting = build_parser().parse_args(["export", "snapshots", "-o", "x.parquet"])
    assert exporting.entity == "snapshots"


def _check_table_against_model(table: Table, kind_model: type[Record], columns: dict[str, dict[str, Any]]) -> None:
    """``columns``: name → {"type", "nullable"} as the database (or the metadata) has them."""
    for rule in rules_of(kind_model):
        assert rule.name in columns, f"{table.name} has no column {rule.name}"
        column = columns[rule.name]
        nullable = rule.optional
        assert bool(column["nullable"]) == nullable, f"{table.name}.{rule.name}: nullable should be {nullable}"
        _check_type(table.name, rule, column["type"])


def _check_type(table: str, rule: FieldRule, column_type: Any) -> None:
    if rule.kind in ("text", "choice") and isinstance(column_type, String) and column_type.length is not None:
        longest = max(map(len, rule.choices)) if rule.kind == "choice" else rule.max_length
        assert longest is not None and longest <= column_type.length, f"{table}.{rule.name} is longer than its column"


def test_each_registered_table_holds_its_models_fields_key_time_and_sort_columns() -> None:
    for kind in RECORD_KINDS:
        table = TABLE_OF[kind.entity]
        columns = {column.name: {"type": column.type, "nullable": column.nullable} for column in table.c}
        _check_table_against_model(table, kind.model, columns)
        for rule in rules_of(kind.model):
            assert isinstance(table.c[rule.name].type, COLUMN_TYPES[rule.kind]), f"{table.name}.{rule.name}"
            if rule.kind == "choice":  # the CHECK constraint allows exactly the model's words
                checks = " ".join(str(c.sqltext) for c in table.constraints if hasattr(c, "sqltext"))
                assert all(f"'{word}'" in checks for word in rule.choices), f"{table.name}.{rule.name}"
        assert {kind.time_column, *kind.sort_columns, *kind.filters, "instance_id"} <= set(table.c.keys())
        unique = {tuple(c.name for c in table.primary_key.columns)}
        unique |= {tuple(c.name for c in index.columns) for index in table.indexes if index.unique}
        unique |= {tuple(c.name for c in u.columns) for u in table.constraints if isinstance(u, UniqueConstraint)}
        unique |= {(column.name,) for column in table.c if column.unique}
        assert kind.natural_key in unique, f"{table.name} has no unique index on {kind.natural_key}"


async def test_the_latest_migration_creates_each_registered_table_as_the_registry_needs(fresh_url: str) -> None:
    database = create_database(make_settings(database_url=fresh_url))
    try:
        await upgrade(database)
        async with database.read() as connection:

            def read_schema(sync_connection: Any) -> dict[str, Any]:
                inspector = inspect(sync_connection)
                schema: dict[str, Any] = {}
                for table in RECORD_TABLES:
                    unique = {tuple(pk) for pk in [inspector.get_pk_constraint(table.name)["constrained_columns"]]}
                    unique |= {tuple(ix["column_names"]) for ix in inspector.get_indexes(table.name) if ix["unique"]}
                    unique |= {tuple(uq["column_names"]) for uq in inspector.get_unique_constraints(table.name)}
                    indexed = {ix["column_names"][0] for ix in inspector.get_indexes(table.name)}
                    columns = {column["name"]: column for column in inspector.get_columns(table.name)}
                    schema[table.name] = (columns, unique, indexed)
                return schema

            schema = await connection.run_sync(read_schema)
    finally:
        await database.dispose()
    for kind in RECORD_KINDS:
        table = TABLE_OF[kind.entity]
        columns, unique, indexed = schema[table.name]
        _check_table_against_model(table, kind.model, columns)
        assert "instance_id" in columns
        assert kind.natural_key in unique, f"{table.name}: no unique index on {kind.natural_key} after the migrations"
        assert kind.time_column in indexed | {name for key in unique for name in key[:1]}, (
            f"{table.name}: its time column {kind.time_column} leads no index"
        )


def test_a_table_that_lost_a_field_or_a_limit_is_caught() -> None:
    trades = TABLE_OF["trade"]
    columns = {column.name: {"type": column.type, "nullable": column.nullable} for column in trades.c}
    kind = BY_ENTITY["trade"]
    for broken in (
        {name: column for name, column in columns.items() if name != "pattern_type"},
        {**columns, "symbol": {"type": String(16), "nullable": False}},
        {**columns, "stop_loss": {"type": ExactNumeric(), "nullable": False}},
    ):
        try:
            _check_table_against_model(trades, kind.model, broken)
        except AssertionError:
            continue
        raise AssertionError(f"not caught: {broken}")
