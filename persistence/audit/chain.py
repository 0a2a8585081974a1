"""The audit chain, pure: a version's canonical JSON, an entry's header, and the SHA-256 that links it to the last.

An entry holds a version as canonical JSON (:func:`canonical_version`: sorted keys, decimals as strings with exactly
eight places, timestamps in UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``) and links to the one before it in its instance's
chain::

    hash = SHA-256(prev_hash "\\n" header "\\n" payload)

where ``header`` is the canonical JSON of the entry's other columns (``instance_id``, ``seq``, ``entity``,
``natural_key``, ``recorded_at``, ``key_prev_hash``), so every stored column is covered. A chain starts at ``seq`` 1
with ``prev_hash`` :data:`GENESIS`.

``key_prev_hash`` links an entry to the previous entry of the same record (its entity and natural key), whichever
instance wrote it (:data:`GENESIS` for a record's first): the order of one record's versions across instances is
sealed by the hashes too, not only by ``audit_log.id``. Entries written before migration 0005 have none (``NULL``);
their header is the one they were hashed with, without the key. Nothing here reads a database or a clock:
:mod:`persistence.audit.trail` appends what this computes, and :mod:`persistence.audit.verify` recomputes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from json.encoder import encode_basestring_ascii
from typing import Any

from persistence.db.columns import take_sqlite_datetime, to_sqlite_datetime

GENESIS = "0" * 64
"""The ``prev_hash`` of a chain's first entry."""
BASELINE_INSTANCE = "pre-audit"
"""The instance id that migration 0003 gives rows written before the trail, and the chain of their entries."""


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a record as it was written: its entity, natural key and every field's value.

    ``payload`` is its canonical JSON when the writer already made it (``None``: :class:`AuditLog` makes it);
    ``key_prev_hash`` is the hash of the record's latest entry before this transaction (:data:`GENESIS`: none).
    """

    entity: str
    key: str
    values: Mapping[str, Any]
    payload: str | None = None
    key_prev_hash: str = GENESIS


@dataclass(frozen=True, slots=True)
class AuditHead:
    """Where a chain ends: its instance, the last ``seq`` and that entry's hash."""

    instance_id: str
    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One entry of ``audit_log``, decoded; ``version`` is the parsed payload."""

    id: int
    instance_id: str
    seq: int
    entity: str
    natural_key: str
    payload: str
    recorded_at: datetime
    prev_hash: str
    hash: str
    key_prev_hash: str | None = None

    @property
    def version(self) -> dict[str, Any]:
        """The version this entry records, as JSON values (decimals and timestamps as strings)."""
        value: dict[str, Any] = json.loads(self.payload)
        return value

    def to_json(self) -> dict[str, Any]:
        """The entry as JSON values, the version parsed."""
        return {
            "seq": self.seq,
            "instance_id": self.instance_id,
            "entity": self.entity,
            "natural_key": self.natural_key,
            "recorded_at": canonical_time(self.recorded_at),
            "version": self.version,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "key_prev_hash": self.key_prev_hash,
        }


def canonical_time(value: datetime) -> str:
    """A timestamp's one canonical text: UTC, microseconds always present, ``Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    elif value.utcoffset():
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _canonical_value(value: Any) -> Any:
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is Decimal:
        return f"{value:.8f}"
    if kind is datetime:
        return canonical_time(value)
    if kind is int or kind is str:
        return value
    if isinstance(value, Decimal):
        return f"{value:.8f}"
    if isinstance(value, datetime):
        return canonical_time(value)
    if isinstance(value, bool | int | str):
        return value
    raise TypeError(f"no canonical form for {kind.__name__}")


def canonical_json(values: Mapping[str, Any]) -> str:
    """Canonical JSON of a mapping of JSON-ready values: sorted keys, no spaces, ASCII only."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_version(values: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The canonical JSON of a record version: ``fields`` of ``values``, decimals and timestamps as text."""
    return canonical_json({name: _canonical_value(values[name]) for name in fields})


def _text(value: Any) -> str:
    """A value's canonical JSON text (what :func:`canonical_json` writes for :func:`_canonical_value` of it)."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is Decimal:
        return f'"{value:.8f}"'
    if kind is datetime:
        return f'"{canonical_time(value)}"'
    if value is None:
        return "null"
    return json.dumps(_canonical_value(value))


def _utc_text(value: datetime) -> str:
    """The quoted canonical text of a timestamp, from SQLite's stored form (the cheapest exact formatting there is)."""
    # YYYY-MM-DD HH:MM:SS.ffffff in UTC; on SQLite the row's encoding of this very value has just made it.
    stored = take_sqlite_datetime(value) or to_sqlite_datetime(value)
    return f'"{stored[:10]}T{stored[11:]}Z"'


class VersionEncoder:
    """:func:`canonical_version` for one set of fields, generated once: the same text, several times faster.

    The keys are written in sorted order with their JSON text once; each value is encoded in place by an expression
    chosen for its kind (``kinds`` maps a field to ``decimal``, ``datetime`` or ``text``; any other field takes the
    general path). A test holds it to :func:`canonical_version` for every kind of value.
    """

    def __init__(self, fields: Sequence[str], kinds: Mapping[str, str] | None = None) -> None:
        kinds = kinds or {}
        pieces: list[str] = []
        template = ""
        for index, name in enumerate(sorted(fields)):
            template += ("{" if index == 0 else ",") + json.dumps(name).replace("%", "%%") + ":%s"
            value = f"values[{name!r}]"
            kind = kinds.get(name)
            if kind == "decimal":
                # A decimal with exactly eight places (every validated one) is its own str(), which has no exponent
                # then: cheaper than formatting it.
                text = (
                    f"('null' if (v := {value}) is None else (f'\"{{d}}\"' if (d := str(v))[-9:-8] == '.' and "
                    f"'E' not in d and 'e' not in d else f'\"{{v:.8f}}\"') if type(v) is _D else _t(v))"
                )
            elif kind == "datetime":
                text = f"('null' if (v := {value}) is None else _u(v) if type(v) is _T else _t(v))"
            elif kind == "text":
                text = f"('null' if (v := {value}) is None else _e(v) if type(v) is str else _t(v))"
            else:
                text = f"_t({value})"
            pieces.append(text)
        # One %-format of the whole object: cheaper than concatenating a piece at a time.
        source = f"def encode(values):\n    return {template + '}'!r} % (" + ", ".join(pieces) + ",)\n"
        namespace: dict[str, Any] = {
            "_t": _text,
            "_u": _utc_text,
            "_e": encode_basestring_ascii,
            "_D": Decimal,
            "_T": datetime,
        }
        exec(compile(source, "<VersionEncoder>", "exec"), namespace)  # noqa: S102
        self.encode: Callable[[Mapping[str, Any]], str] = namespace["encode"]


def entry_hash(prev_hash: str, header: str, payload: str) -> str:
    """SHA-256 (hex) linking an entry to ``prev_hash``, over its header (:func:`header_text`) and its payload."""
    # Entries are ASCII; UTF-8 hashes them the same and lets a tampered, non-ASCII one be reported, not crash.
    return hashlib.sha256(f"{prev_hash}\n{header}\n{payload}".encode("utf-8", "surrogatepass")).hexdigest()


def header_text(
    instance_id: str, seq: int, entity: str, natural_key: str, recorded_at: str, key_prev_hash: str | None = None
) -> str:
    """The hashed header of an entry, every column but the payload and the two chain hashes, as canonical JSON
    written directly (keys sorted; ``recorded_at`` already canonical). ``key_prev_hash`` ``None`` (an entry from
    before migration 0005) leaves the key out, as those entries were hashed."""
    link = "" if key_prev_hash is None else f',"key_prev_hash":{encode_basestring_ascii(key_prev_hash)}'
    return (
        f'{{"entity":{encode_basestring_ascii(entity)},"instance_id":{encode_basestring_ascii(instance_id)}{link},'
        f'"natural_key":{encode_basestring_ascii(natural_key)},"recorded_at":"{recorded_at}","seq":{seq}}}'
    )


def entry_problem(
    expected: int,
    previous: str,
    previous_id: int,
    instance_id: str,
    entry: Sequence[Any],
    at: str,
) -> str | None:
    """What is wrong with one entry of ``instance_id``'s chain, given what the entry before it left (the seq it
    expects, its hash and its id), or ``None``. ``entry`` is (id, seq, entity, natural_key, payload, recorded_at,
    prev_hash, hash, key_prev_hash) and ``at`` its ``recorded_at`` as canonical text: a gap first, then the link to
    the entry before, then the entry's own hash, then its id (which orders a record's versions across chains, so it
    rises with seq in one chain). An empty ``at`` is a time PostgreSQL holds and Python cannot (before year 1, after
    9999, infinity)."""
    entry_id, seq, entity, key, payload, _, prev_hash, digest, link = entry
    if seq != expected:
        missing = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
        return f"{missing} missing before it (a gap in the chain)"
    if prev_hash != previous:
        return f"prev_hash {prev_hash[:16]}… does not link to the hash of seq {seq - 1}"
    if not at:
        return "its recorded_at is outside the years 1 to 9999 (no writer stores such a time)"
    if digest != entry_hash(previous, header_text(instance_id, seq, entity, key, at, link), payload):
        return "hash does not match the entry's contents (the entry was changed)"
    if entry_id <= previous_id:
        return f"its id {entry_id} is not after seq {seq - 1}'s ({previous_id}): the entry was moved"
    return None


def chain_entries(
    head: AuditHead | None, instance_id: str, versions: Sequence[tuple[str, str, str]], recorded_at: datetime
) -> list[dict[str, Any]]:
    """The rows that extend the chain ending at ``head`` by ``versions`` (entity, key, payload), in order, without
    key links: the form of entries before migration 0005 (migration 0003's baseline writes it)."""
    seq = head.seq if head is not None else 0
    previous = head.hash if head is not None else GENESIS
    at = canonical_time(recorded_at)
    rows: list[dict[str, Any]] = []
    # entry_hash(previous, header_text(...), payload) in one piece of text: the header's constant parts (the entity's,
    # the instance's, the time's) are encoded once per batch, not once per entry. A test holds it to entry_hash.
    sha256 = hashlib.sha256
    quote = encode_basestring_ascii
    heads: dict[str, str] = {}
    instance = quote(instance_id)
    middle = f',"recorded_at":"{at}","seq":'
    for entity, key, payload in versions:
        seq += 1
        head_text = heads.get(entity)
        if head_text is None:
            head_text = heads[entity] = f'\n{{"entity":{quote(entity)},"instance_id":{instance},"natural_key":'
        digest = sha256(
            f"{previous}{head_text}{quote(key)}{middle}{seq}}}\n{payload}".encode("utf-8", "surrogatepass")
        ).hexdigest()
        rows.append(
            {
                "instance_id": instance_id,
                "seq": seq,
                "entity": entity,
                "natural_key": key,
                "payload": payload,
                "recorded_at": recorded_at,
                "prev_hash": previous,
                "hash": digest,
            }
        )
        previous = digest
    return rows


def linked_entries(
    head: AuditHead | None, instance_id: str, versions: Sequence[tuple[str, str, str, str]], recorded_at: datetime
) -> list[dict[str, Any]]:
    """The rows that extend the chain ending at ``head`` by ``versions`` (entity, key, payload, key_prev_hash), in
    order, each linked to the previous entry of its record: the given ``key_prev_hash`` for a record's first version
    here, the entry before it here for the next ones. A test holds each hash to :func:`entry_hash` of its header."""
    seq = head.seq if head is not None else 0
    previous = head.hash if head is not None else GENESIS
    at = canonical_time(recorded_at)
    rows: list[dict[str, Any]] = []
    sha256 = hashlib.sha256
    quote = encode_basestring_ascii
    heads: dict[str, str] = {}
    last: dict[tuple[str, str], str] = {}
    instance = quote(instance_id)
    middle = f',"recorded_at":"{at}","seq":'
    for entity, key, payload, stored_link in versions:
        seq += 1
        head_text = heads.get(entity)
        if head_text is None:
            head_text = heads[entity] = f'\n{{"entity":{quote(entity)},"instance_id":{instance},"key_prev_hash":"'
        link = last.get((entity, key), stored_link)
        digest = sha256(
            f'{previous}{head_text}{link}","natural_key":{quote(key)}{middle}{seq}}}\n{payload}'.encode(
                "utf-8", "surrogatepass"
            )
        ).hexdigest()
        last[(entity, key)] = digest
        rows.append(
            {
                "instance_id": instance_id,
                "seq": seq,
                "entity": entity,
                "natural_key": key,
                "payload": payload,
                "recorded_at": recorded_at,
                "prev_hash": previous,
                "hash": digest,
                "key_prev_hash": link,
            }
        )
        previous = digest
    return rows
