"""The on-disk outbox: every reliable MQTT message is stored here before it is sent.

An alert that exists only in memory is lost by a broker outage followed by a restart, a
``kill -9`` or a power cut, and a lost alert is a missed machine fault. So a reliable message is
first committed to an SQLite database in the daemon's state dir (WAL journal,
``synchronous=FULL``: once :meth:`Outbox.put` returns, the message survives a power cut) and is
deleted only after the broker acknowledged it (:meth:`Outbox.ack` after PUBACK). Messages are
delivered oldest first, one at a time, so subscribers see them in the order they happened.

The outbox is bounded, because a broker down for weeks must not fill the disk. When full, it
makes room by dropping what a later message makes redundant: a *retained* message is a state
(``state``, discovery config) and the broker keeps only the latest one per topic anyway, so an
older retained message on a topic that has a newer one waiting goes first, then the oldest
retained message. A *non-retained* message is an event (an alert): each one says something no
later message repeats, so it is never dropped; with only events left, :meth:`Outbox.put` raises
:class:`OutboxFull` and the caller decides what to do.

The database is opened in SQLite's exclusive locking mode: a second daemon on the same state dir
would send every message twice and ack the other's messages, so it is refused with
:class:`OutboxError`. The lock belongs to the process and vanishes with it, even after
``kill -9``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import OutboxError, OutboxFull

log = logging.getLogger(__name__)

# PRAGMA user_version of an outbox database; anything else is not ours and is left untouched.
FORMAT_VERSION = 1
_MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name

_SCHEMA = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused, even when empty
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
-- Finds a superseded retained message (an older one on the same topic) without a full scan.
CREATE INDEX outbox_retained ON outbox (topic, id) WHERE retain = 1;
"""

_SUPERSEDED = """
SELECT id, topic FROM outbox AS old
WHERE retain = 1
  AND EXISTS (SELECT 1 FROM outbox AS new WHERE new.retain = 1 AND new.topic = old.topic AND new.id > old.id)
ORDER BY id LIMIT 1
"""
# ``id < ?`` excludes the message being put: it is not traded for itself.
_OLDEST_RETAINED = "SELECT id, topic FROM outbox WHERE retain = 1 AND id < ? ORDER BY id LIMIT 1"


@dataclass(frozen=True)
class OutboxMessage:
    """One stored message; ``id`` orders delivery and is what :meth:`Outbox.ack` takes."""

    id: int
    topic: str
    payload: str
    qos: int
    retain: bool


class Outbox:
    """A bounded, persistent FIFO of MQTT messages awaiting the broker's acknowledgement.

    Thread-safe: one connection, every use under one lock (the daemon puts from its pipeline
    thread while the publisher's delivery thread peeks and acks).
    """

    def __init__(self, path: Path, max_messages: int) -> None:
        if max_messages < 1:
            raise ValueError(f"outbox {path}: max_messages must be >= 1, got {max_messages}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.dropped_total = 0  # retained messages dropped to make room (for metrics)
        self._lock = threading.Lock()
        self._db = self._open()
        try:
            # Kept in memory (only this connection writes, under the exclusive lock), so len()
            # and the fullness check do not count 100k rows on every put.
            self._count: int = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except sqlite3.Error as exc:
            self._db.close()
            raise self._error(exc) from None

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        try:
            # Exclusive before WAL, so no shared-memory index is created and the lock is ours
            # from the first write below until close.
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise OutboxError(f"outbox {self.path}: cannot use the WAL journal (SQLite chose {mode!r})")
            db.execute("PRAGMA synchronous = FULL")
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise OutboxError(f"outbox {self.path}: database is corrupt ({problems[0]}); move it aside to start an empty outbox")
            db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now, not at the first put
            try:
                self._prepare_schema(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            db.close()
            raise self._error(exc) from None
        except OutboxError:
            db.close()
            raise
        return db

    def _prepare_schema(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == FORMAT_VERSION:
            return
        if version != 0:
            raise OutboxError(f"outbox {self.path}: unsupported outbox format version {version} (expected {FORMAT_VERSION})")
        tables = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchone()[0]
        if tables:
            raise OutboxError(f"outbox {self.path}: an SQLite database that is not an outbox; refusing to touch it")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")

    def _error(self, exc: sqlite3.Error) -> OutboxError:
        """One line naming the file, and what the operator can do about it."""
        if getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            return OutboxError(f"outbox {self.path}: in use by another process (is a second daemon running on this state dir?)")
        if isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
            return OutboxError(f"outbox {self.path}: not a usable database ({exc}); move it aside to start an empty outbox")
        return OutboxError(f"outbox {self.path}: {exc}")

    def put(self, topic: str, payload: str, qos: int = 1, retain: bool = False) -> int:
        """Store a message durably and return its id (ids increase: delivery is FIFO by id).

        When the outbox is full, drops one retained message (superseded ones first) to make
        room; raises :class:`OutboxFull` when everything waiting is an alert.
        """
        _check_message(topic, qos)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    cursor = self._db.execute(
                        "INSERT INTO outbox (topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                        (topic, payload, qos, int(retain)),
                    )
                    new_id = cursor.lastrowid
                    assert new_id is not None  # an INSERT into a rowid table always sets it
                    if self._count >= self.max_messages:
                        self._make_room(new_id, topic)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc) from None
            if self._count < self.max_messages:
                self._count += 1
            return new_id

    def _make_room(self, new_id: int, topic: str) -> None:
        """Delete one retained message other than ``new_id`` (inside put's transaction)."""
        row = self._db.execute(_SUPERSEDED).fetchone()  # never new_id: nothing is newer
        why = "superseded by a newer retained message on its topic"
        if row is None:
            row = self._db.execute(_OLDEST_RETAINED, (new_id,)).fetchone()
            why = "oldest retained message"
        if row is None:
            raise OutboxFull(f"outbox {self.path}: full of alerts ({self._count} waiting, max_messages {self.max_messages}); refusing message for {topic}")
        self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
        self.dropped_total += 1
        counts = dict(self._db.execute("SELECT retain, COUNT(*) FROM outbox GROUP BY retain").fetchall())
        log.warning(
            "outbox %s full (max_messages %d): dropped message %d for %s (%s); waiting now: %d alerts, %d retained, %d dropped in total",
            self.path, self.max_messages, row[0], row[1], why, counts.get(0, 0), counts.get(1, 0), self.dropped_total,
        )

    def peek(self) -> OutboxMessage | None:
        """The oldest message, left in place until :meth:`ack`; None when empty."""
        with self._lock:
            try:
                row = self._db.execute("SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id LIMIT 1").fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc) from None
        if row is None:
            return None
        return OutboxMessage(id=row[0], topic=row[1], payload=row[2], qos=row[3], retain=bool(row[4]))

    def ack(self, message_id: int) -> None:
        """Delete a delivered message. An unknown id is ignored: the message was dropped to make
        room while it was in flight, or acked already."""
        with self._lock:
            try:
                deleted = self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,)).rowcount
            except sqlite3.Error as exc:
                raise self._error(exc) from None
            self._count -= deleted

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        """Close the database and release the lock; undelivered messages stay for the next open."""
        with self._lock:
            self._db.close()


def _check_message(topic: str, qos: int) -> None:
    """Refuse what the broker could never accept: such a message would sit at the head of the
    FIFO forever and block every alert behind it."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ValueError(f"outbox: {topic!r} is not a valid MQTT topic name (empty, wildcard, NUL or too long)")
    if qos not in (0, 1, 2):
        raise ValueError(f"outbox: qos must be 0, 1 or 2, got {qos!r}")
