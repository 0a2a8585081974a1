"""Anchored checkpoints of the audit chains: writing and reading checkpoint files, signing and checking them.

A hash chain alone cannot expose someone who rewrites a row and every later entry, recomputing the hashes. So the
sidecar keeps, outside the database, a checkpoint of its chain's head every ``PERSISTENCE_AUDIT_ANCHOR_SECONDS`` while
entries are written and at ``close()``: one JSON line appended (and fsynced) to
``PERSISTENCE_AUDIT_ANCHOR_DIR/<instance>.jsonl``::

    {"hash":"…","instance_id":"bot-a","seq":1234,"signature":"…","time":"2026-12-04T21:00:00.000000Z"}

``signature`` (present when ``PERSISTENCE_AUDIT_SIGNING_KEY`` is set) is the Ed25519 signature, base64, of the
checkpoint's **signed bytes**: the canonical JSON (sorted keys, no spaces, ASCII) of exactly the four fields
``hash``, ``instance_id``, ``seq`` and ``time``, encoded as ASCII — :meth:`Checkpoint.signed_bytes`.

:class:`Anchorer` is the background task: it learns the head from the
:class:`~persistence.observe.events.BatchCommitted` events (no query), sleeps on the injected clock, writes in a
thread, and never sits on the write path. ``audit verify --anchors`` holds each checkpoint against its chain
(:mod:`persistence.audit.verify`); :func:`load_signing_key`, :func:`load_public_key` and :func:`generate_key` deal
with the keys (the ``cryptography`` package does the cryptography).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from persistence.audit.chain import canonical_json, canonical_time
from persistence.errors import AuditKeyError
from persistence.observe.events import AuditAnchored, BatchCommitted, Event, EventBus
from persistence.observe.logger import get_logger

log = get_logger("persistence.anchors")

_HEX = frozenset("0123456789abcdef")
_CANONICAL_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z", re.ASCII)
MAX_SEQ = 2**63 - 1
"""The largest ``seq`` a database column holds (a 64-bit integer)."""
_NAME_BYTES = 200
"""The longest anchor file name made from an instance id as it is; a longer one is shortened (file names: 255)."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint: a chain's instance, the ``seq`` of its head, that entry's hash, when, and a signature."""

    instance_id: str
    seq: int
    hash: str
    time: str
    """UTC, canonical (``YYYY-MM-DDTHH:MM:SS.ffffffZ``)."""
    signature: str | None = None
    """Base64 Ed25519 signature of :meth:`signed_bytes`, or ``None`` (no signing key)."""

    def signed_bytes(self) -> bytes:
        """What a signature covers: canonical JSON of ``hash``, ``instance_id``, ``seq``, ``time``, ASCII."""
        fields = {"hash": self.hash, "instance_id": self.instance_id, "seq": self.seq, "time": self.time}
        return canonical_json(fields).encode("ascii")

    def to_line(self) -> str:
        """The checkpoint as one line of its file (canonical JSON, no newline)."""
        fields: dict[str, Any] = {"hash": self.hash, "instance_id": self.instance_id, "seq": self.seq}
        fields["time"] = self.time
        if self.signature is not None:
            fields["signature"] = self.signature
        return canonical_json(fields)

    @property
    def at(self) -> datetime:
        """:attr:`time` as an aware datetime."""
        return datetime.fromisoformat(self.time.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class AnchorLine:
    """A line of an anchor file: where it is (file and line number) and its checkpoint, or why it cannot be read."""

    path: Path
    line: int
    checkpoint: Checkpoint | None
    problem: str | None = None
    cut_short: bool = False
    """The line is the start of a checkpoint that was never finished (a crash or a full disk while appending)."""

    @property
    def where(self) -> str:
        """``FILE:LINE``, for messages."""
        return f"{self.path}:{self.line}"

    def describe(self) -> str:
        """The checkpoint named for a human: where it is, its instance and seq."""
        if self.checkpoint is None:
            return f"checkpoint {self.where}"
        return (
            f"checkpoint {self.where} (instance {self.checkpoint.instance_id!r}, seq {self.checkpoint.seq}, "
            f"{self.checkpoint.time})"
        )


def parse_checkpoint(text: str) -> Checkpoint:
    """A checkpoint from one line of an anchor file; ``ValueError`` saying what is wrong with it."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg})") from None
    except RecursionError:
        raise ValueError("not JSON (nested too deeply)") from None
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    instance, seq, digest, at = (fields.get(name) for name in ("instance_id", "seq", "hash", "time"))
    signature = fields.get("signature")
    if not isinstance(instance, str) or not instance:
        raise ValueError("no instance_id")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise ValueError("no seq (a positive integer a database holds)")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        raise ValueError("no hash (64 hex digits)")
    if not isinstance(at, str):
        raise ValueError("no time")
    try:
        if not _CANONICAL_TIME.fullmatch(at):
            raise ValueError
        datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"time {at!r} is not a UTC time as the sidecar writes it (YYYY-MM-DDTHH:MM:SS.ffffffZ)"
        ) from None
    if signature is not None and not isinstance(signature, str):
        raise ValueError("signature is not text")
    extra = set(fields) - {"instance_id", "seq", "hash", "time", "signature"}
    if extra:
        raise ValueError(f"unknown field(s) {', '.join(sorted(extra))}")
    return Checkpoint(instance, seq, digest, at, signature)


def anchor_path(directory: Path, instance_id: str) -> Path:
    """The anchor file of ``instance_id`` in ``directory``: the id percent-encoded where a file name needs it; an id
    whose encoding is too long for a file name (non-ASCII takes 9 characters a letter) keeps its first characters and
    adds a digest of the whole id, so two ids never share a file."""
    name = quote(instance_id, safe="-_.@+=,")
    if len(name) > _NAME_BYTES:
        digest = hashlib.sha256(instance_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        kept = ""
        for character in instance_id:
            encoded = quote(character, safe="-_.@+=,")
            if len(kept) + len(encoded) > _NAME_BYTES - 40:
                break
            kept += encoded
        name = f"{kept}~{digest}"
    return directory / f"{name}.jsonl"


def append_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Append ``checkpoint`` as one line and fsync it (blocking: run it in a thread)."""
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = (checkpoint.to_line() + "\n").encode("ascii")
        size = os.fstat(descriptor).st_size
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            data = b"\n" + data  # a line cut short by a crash stays a line of its own, never glued to this one
        written = 0
        try:
            while written < len(data):
                written += os.write(descriptor, data[written:])
            os.fsync(descriptor)
        except OSError:
            if written:  # a full disk took part of the line: take it back, so the file holds whole lines only
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, size)
            raise
    finally:
        os.close(descriptor)
    if created:  # the new file's name must survive a crash too
        with contextlib.suppress(OSError):
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def _cut_short(raw: bytes) -> bool:
    """Whether ``raw`` is the start of a checkpoint line that was never finished: it begins as every line the sidecar
    writes (``{"hash":"``) and stops before the closing brace."""
    text = raw.strip()
    return text.startswith(b'{"hash":"') and not text.endswith(b"}")


def read_anchor_lines(directory: Path) -> list[AnchorLine]:
    """Every line of every ``*.jsonl`` file in ``directory``, parsed, in file then line order (blocking)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder")
    lines: list[AnchorLine] = []
    for path in sorted(directory.glob("*.jsonl")):
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                if not raw.strip():
                    continue
                try:
                    checkpoint = parse_checkpoint(raw.decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as error:
                    lines.append(AnchorLine(path, number, None, f"cannot be read: {error}", _cut_short(raw)))
                    continue
                lines.append(AnchorLine(path, number, checkpoint))
    return lines


# ---------------------------------------------------------------------------------------------- keys


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuditKeyError(
            path,
            f"the signing key is readable by others (mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`",
        )


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM at ``path``; :class:`AuditKeyError` if missing, not one, or readable by others.

    A key any other user can read could sign forged checkpoints, so it is refused, as ssh refuses such a key.
    """
    try:
        _check_private(path)
        data = path.read_bytes()
    except OSError as error:
        raise AuditKeyError(path, f"cannot read the signing key: {error.strerror or error}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise AuditKeyError(path, "not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(path, "not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM at ``path``; :class:`AuditKeyError` if missing or not one."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise AuditKeyError(path, f"cannot read the public key: {error.strerror or error}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise AuditKeyError(path, "not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(path, "not an Ed25519 public key")
    return key


def public_key_path(path: Path) -> Path:
    """Where :func:`generate_key` puts the public key of the private key at ``path``: ``PATH.pub``."""
    return path.with_name(path.name + ".pub")


def generate_key(path: Path) -> Path:
    """Write a new Ed25519 private key (PEM, mode 0600) at ``path`` and its public key at ``PATH.pub``.

    Refuses to replace either file. Returns the public key's path.
    """
    if not path.name or path.name in (".", ".."):
        raise AuditKeyError(path, "is not a file name for the key")
    public = public_key_path(path)
    for existing in (path, public):
        if existing.exists():
            raise AuditKeyError(existing, "already exists; a key is never overwritten")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(descriptor, 0o600)  # whatever the umask
            os.write(descriptor, private_pem)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        public.write_bytes(public_pem)
    except OSError as error:
        raise AuditKeyError(error.filename or path, f"cannot write the key: {error.strerror or error}") from None
    return public


def sign(key: Ed25519PrivateKey, checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` with its signature."""
    signature = base64.b64encode(key.sign(checkpoint.signed_bytes())).decode("ascii")
    return replace(checkpoint, signature=signature)


def signature_ok(key: Ed25519PublicKey, checkpoint: Checkpoint) -> bool:
    """Whether ``checkpoint`` carries a signature by ``key`` over its signed bytes."""
    if checkpoint.signature is None:
        return False
    try:
        key.verify(base64.b64decode(checkpoint.signature, validate=True), checkpoint.signed_bytes())
    except (InvalidSignature, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------- the background task

Sleep = Callable[[float], Awaitable[None]]
Now = Callable[[], datetime]


class Anchorer:
    """Checkpoints one chain (this sidecar's instance) in the background; see the module docstring.

    It subscribes to the bus at construction, so the heads of a journal replay at start-up are seen; :meth:`start`
    starts the periodic task, :meth:`stop` ends it and writes the last checkpoint (the one at ``close()``). A
    checkpoint is written only when the head moved since the last one. A failed write is logged
    (``audit_anchor_failed``) and retried at the next tick; the write path never waits for any of it.
    """

    def __init__(
        self,
        instance_id: str,
        directory: Path,
        interval: float,
        *,
        bus: EventBus,
        sleep: Sleep,
        now: Now,
        key_path: Path | None = None,
        durable: Callable[[], None] | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.path = anchor_path(directory, instance_id)
        self._interval = interval
        self._bus = bus
        self._sleep = sleep
        self._now = now
        self._key_path = key_path
        self._durable = durable
        self._key: Ed25519PrivateKey | None = None
        self._head: tuple[int, str] | None = None
        self._anchored: tuple[int, str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()
        self._unsubscribe = bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if type(event) is BatchCommitted and event.audit_seq is not None and event.audit_hash is not None:
            self._head = (event.audit_seq, event.audit_hash)

    async def load_key(self) -> None:
        """Read the signing key (in a thread); :class:`AuditKeyError` when it cannot be used."""
        if self._key_path is not None and self._key is None:
            self._key = await asyncio.to_thread(load_signing_key, self._key_path)

    def start(self) -> None:
        """Start the periodic checkpoints."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="persistence-audit-anchors")

    async def _run(self) -> None:
        while True:
            await self._sleep(self._interval)
            # Shielded: stop() never cuts a write short, so the checkpoint at close() always lands after it.
            await asyncio.shield(self.checkpoint())

    async def checkpoint(self) -> Checkpoint | None:
        """Write a checkpoint of the head if it moved since the last one; the checkpoint written, or ``None``."""
        async with self._writing:
            head = self._head
            if head is None or head == self._anchored:
                return None
            checkpoint = Checkpoint(self.instance_id, head[0], head[1], canonical_time(self._now()))
            if self._key is not None:
                checkpoint = sign(self._key, checkpoint)
            try:
                await asyncio.to_thread(self._append, checkpoint)
            except OSError as error:
                log.warning("audit_anchor_failed", path=str(self.path), error=f"{type(error).__name__}: {error}")
                return None
            self._anchored = head
        self._bus.publish(
            AuditAnchored(
                instance_id=checkpoint.instance_id,
                seq=checkpoint.seq,
                hash=checkpoint.hash,
                time=checkpoint.time,
                path=str(self.path),
                signed=checkpoint.signature is not None,
            )
        )
        return checkpoint

    def _append(self, checkpoint: Checkpoint) -> None:
        """What the database committed made durable first (``durable``), then the checkpoint appended: a checkpoint
        never names an entry a power cut could take back. Blocking: run in a thread."""
        if self._durable is not None:
            self._durable()
        append_checkpoint(self.path, checkpoint)

    async def stop(self) -> None:
        """End the periodic task and write the last checkpoint."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.checkpoint()
        finally:
            self._unsubscribe()


def checkpoints_of(lines: list[AnchorLine]) -> Iterator[tuple[AnchorLine, Checkpoint]]:
    """The readable lines with their checkpoints."""
    for line in lines:
        if line.checkpoint is not None:
            yield line, line.checkpoint


# ---------------------------------------------------------------------------------------------- checking


@dataclass(slots=True)
class Anchors:
    """The checkpoints ``audit verify --anchors`` holds the chains against, read and pre-checked.

    ``problem`` is the first line that cannot be trusted on its own (unreadable, in another instance's file,
    unsigned or badly signed when a public key is given), with the line; ``marks`` maps each instance to its
    checkpoints by ``seq``.
    """

    directory: Path
    interval: float
    lines: list[AnchorLine]
    signed_checked: bool
    marks: dict[str, dict[int, list[AnchorLine]]]
    problem: tuple[AnchorLine, str] | None = None
    cut_short: list[AnchorLine] = field(default_factory=list)
    """Lines that are the start of a checkpoint never finished: no more than a missing checkpoint (reported)."""
    unsigned: int = 0
    """With public keys: unsigned checkpoints written before their file's first signed one (reported)."""

    @property
    def count(self) -> int:
        return sum(len(found) for marks in self.marks.values() for found in marks.values())


def load_anchors(directory: Path, interval: float, keys: Sequence[Ed25519PublicKey] = ()) -> Anchors:
    """Read ``directory``'s anchor files and check each line on its own (blocking: run it in a thread).

    With public ``keys`` (several: a key replaced by another), every signed line must verify with one of them, and a
    file's lines must stay signed from its first signed line on; the unsigned lines before it (written before
    signing was turned on) are checked against the chain like any other and counted in :attr:`Anchors.unsigned`.
    :class:`AuditKeyError` when the checkpoints are signed and no public key is given: signed checkpoints are
    never taken on trust.
    """
    lines = read_anchor_lines(directory)
    anchors = Anchors(directory, interval, lines, bool(keys), {})
    if not keys and any(line.checkpoint and line.checkpoint.signature for line in lines):
        raise AuditKeyError(
            directory, "the checkpoints are signed: pass --public-key PATH.pub (written by `audit keygen`)"
        )
    signing_began: set[Path] = set()
    for line in lines:
        if line.cut_short:
            # A crash or a full disk while appending: what the line would have anchored is covered by the gap check,
            # like a checkpoint that was never written. Deleting whole lines is no harder than cutting one short.
            anchors.cut_short.append(line)
            continue
        checkpoint = line.checkpoint
        problem: str | None = line.problem
        if checkpoint is not None and problem is None:
            if anchor_path(line.path.parent, checkpoint.instance_id).name != line.path.name:
                problem = f"names instance {checkpoint.instance_id!r}, not this file's"
            elif keys and checkpoint.signature is None:
                if line.path in signing_began:
                    problem = "is not signed, after signed checkpoints in its file (a line added by hand?)"
                else:
                    anchors.unsigned += 1
            elif keys and not any(signature_ok(key, checkpoint) for key in keys):
                problem = "its signature does not verify with the public key (the line was altered or forged)"
            else:
                signing_began.add(line.path)
        if problem is not None:
            if anchors.problem is None:
                anchors.problem = (line, problem)
            continue
        assert checkpoint is not None
        anchors.marks.setdefault(checkpoint.instance_id, {}).setdefault(checkpoint.seq, []).append(line)
    return anchors


def unanchored_gaps(
    marks: dict[int, list[AnchorLine]], written_at: dict[int, datetime], last_seq: int, interval: float, now: datetime
) -> list[str]:
    """Where entries waited longer than twice ``interval`` for a checkpoint, one line each.

    ``written_at`` holds the ``recorded_at`` of seq 1 and of each entry right after a checkpoint. An entry is anchored
    by the first checkpoint at or after its seq; the first entry after a checkpoint waits longest.
    """
    limit = 2 * interval
    gaps: list[str] = []
    anchored = sorted(
        (seq, min(line.checkpoint.at for line in found if line.checkpoint)) for seq, found in marks.items()
    )
    previous = 0
    for seq, at in anchored:
        if seq <= previous or seq > last_seq:
            continue
        first = written_at.get(previous + 1)
        if first is not None and (at - first).total_seconds() > limit:
            gaps.append(
                f"seq {previous + 1} to {seq} waited {_seconds((at - first).total_seconds())} for a checkpoint "
                f"(more than twice the {interval:g} s interval)"
            )
        previous = seq
    first = written_at.get(previous + 1)
    if previous < last_seq and first is not None and (now - first).total_seconds() > limit:
        gaps.append(
            f"seq {previous + 1} to {last_seq} have no checkpoint, "
            f"{_seconds((now - first).total_seconds())} after seq {previous + 1} was written"
        )
    return gaps


def _seconds(value: float) -> str:
    """A duration for a report line: whole seconds, or hundredths below ten (short test intervals)."""
    return f"{value:,.0f} s" if value >= 10 else f"{value:.2f} s"
