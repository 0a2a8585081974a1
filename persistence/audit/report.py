"""What ``audit verify`` found: :class:`VerifyReport`, with the first :class:`Break` (where, and what is wrong)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Progress = Callable[[int], None]
"""Told the number of entries and rows checked so far."""


@dataclass(frozen=True, slots=True)
class Break:
    """The first problem found: where, and what is wrong."""

    problem: str
    entity: str | None = None
    natural_key: str | None = None
    instance_id: str | None = None
    seq: int | None = None
    anchor: str | None = None
    """The checkpoint that does not match (its file, line, instance and seq), when a checkpoint found it."""

    def describe(self) -> str:
        """One line for a human: the checkpoint, the entry or row, then the problem."""
        where: list[str] = [self.anchor] if self.anchor is not None else []
        if self.instance_id is not None and self.seq is not None:
            where.append(f"entry seq {self.seq} of instance {self.instance_id!r}")
        if self.entity is not None and self.natural_key is not None:
            where.append(f"{self.entity} {self.natural_key!r}")
        return f"{', '.join(where)}: {self.problem}" if where else self.problem


@dataclass(slots=True)
class VerifyReport:
    """What ``verify`` checked, and the first break (``None`` when everything holds)."""

    chains: dict[str, int] = field(default_factory=dict)
    """Entries walked per instance."""
    heads: dict[str, str] = field(default_factory=dict)
    """Each chain's last hash."""
    rows: dict[str, int] = field(default_factory=dict)
    """Rows checked per table."""
    anchors: dict[str, int] = field(default_factory=dict)
    """Checkpoints that matched their chain, per instance (with anchors)."""
    since: dict[str, int] = field(default_factory=dict)
    """Per instance, the ``seq`` of the checkpoint the walk started after (``since_last_anchor``)."""
    gaps: list[str] = field(default_factory=list)
    """Where entries waited more than twice the interval for a checkpoint (reported, not a break)."""
    unsigned: int = 0
    """With public keys: checkpoints written before their file's first signed one, held against their chains
    unsigned (signing turned on later). Reported, not a break."""
    cut_short: list[str] = field(default_factory=list)
    """Anchor lines (``FILE:LINE``) that are the start of a checkpoint never finished, a crash or a full disk while
    appending: reported, not a break (what they would have anchored is covered by the gap check)."""
    unlinked: dict[str, int] = field(default_factory=dict)
    """Per instance, entries without a record link written after a linked entry of their record by an instance that
    has never linked one: a release from before migration 0005 still writing (a rolling upgrade). Reported, not a
    break; their order against the record's other versions is not sealed."""
    outside: int = 0
    """In an export: entries whose record link names an entry the file does not hold (an export filtered by
    instance). Reported, not a break."""
    broken: Break | None = None

    @property
    def ok(self) -> bool:
        return self.broken is None

    def lines(self) -> list[str]:
        """The report for a terminal: one line per chain and per table, then the verdict."""
        lines = [
            f"chain {instance}: {count:,} entries"
            + (f" after checkpoint seq {self.since[instance]:,}" if instance in self.since else "")
            # A chain whose walk ended at a break has no head to show: its count is what was checked before it.
            + (f", head {self.heads[instance]}" if instance in self.heads else " checked before the break")
            for instance, count in self.chains.items()
        ]
        lines += [f"anchors {instance}: {count:,} checkpoints match" for instance, count in self.anchors.items()]
        lines += [f"GAP: {gap}" for gap in self.gaps]
        if self.unsigned:
            lines.append(
                f"NOTE: {self.unsigned:,} checkpoints written before signing was turned on are not signed; they were "
                "held against their chains like the others"
            )
        lines += [
            f"NOTE: checkpoint {where} was cut short while it was written (a crash or a full disk); not used"
            for where in self.cut_short
        ]
        lines += [
            f"NOTE: instance {instance}: {count:,} entries without a record link after linked ones (a release before "
            "migration 0005 still writing): their order is not sealed"
            for instance, count in self.unlinked.items()
        ]
        if self.outside:
            lines.append(
                f"NOTE: {self.outside:,} entries link to entries this export does not hold (a filtered export): "
                "those links are not checked"
            )
        lines += [f"{table}: {count:,} rows match their latest audited version" for table, count in self.rows.items()]
        lines.append("audit trail verified" if self.broken is None else f"BROKEN: {self.broken.describe()}")
        return lines


def mismatch(seq: int, found: str, anchored: str) -> str:
    """The problem of a checkpoint whose entry has another hash."""
    return (
        f"the entry at seq {seq} has hash {found[:16]}…, the checkpoint says {anchored[:16]}… "
        "(the chain was rewritten after it was anchored)"
    )
