"""The MQTT spool: every message on disk, in order, until the broker has it.

One SQLite table, ordered by an AUTOINCREMENT id (never reused, so a reader's
cursor stays valid while rows are deleted behind it). Rows leave the table
only when the broker has them (PUBACK for QoS 1, written to the socket for
QoS 0) or when the table is over its bound: then the oldest go first, and the
number dropped is returned to the caller, which counts and logs it.

WAL with ``synchronous=NORMAL``: a commit survives the process dying (a crash,
SIGKILL, an OOM kill), the last commits may be lost if the machine loses
power; the fsync per commit that would cover that costs more than the spool
is for. The file survives a restart: a new spool on the same file starts with
what the old one left.

A ``meta`` table beside it holds the receiver's stream positions, written in
the same transaction as the messages they cover.

Each message keeps the wall-clock time it was spooled, so its MQTT 5 message
expiry counts the time spent here (:meth:`Spool.read` returns the rest, or
drops it when nothing is left).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

from receiver.payload import Message

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    expiry_s INTEGER,
    spooled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


class Spool:
    """A bounded, ordered, persistent queue of MQTT messages."""

    def __init__(self, path: Path, max_records: int) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_records = max_records
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        count, low, high = self._db.execute(
            "SELECT count(*), min(id), max(id) FROM spool"
        ).fetchone()
        self._count: int = count
        self._min_id: int = low if low is not None else 0
        self._max_id: int = high if high is not None else 0
        self.expired = 0

    def __len__(self) -> int:
        return self._count

    @property
    def max_id(self) -> int:
        """The id of the newest row ever added (0 for a new file)."""
        return self._max_id

    def append(
        self, messages: Sequence[Message], now: float, meta: Mapping[str, bytes] | None = None
    ) -> int:
        """Add ``messages`` after every row, and set ``meta``, in one transaction.

        Returns the number of oldest rows dropped to fit. Whatever ``meta`` says
        (the receiver's stream positions) is on disk exactly when the messages are.
        """
        if not messages and not meta:
            return 0
        rows = [(m.topic, m.payload, m.qos, int(m.retain), m.expiry_s, now) for m in messages]
        with self._transaction():
            if meta:
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items()
                )
            if not rows:
                return 0
            self._db.executemany(
                "INSERT INTO spool (topic, payload, qos, retain, expiry_s, spooled_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            (high,) = self._db.execute("SELECT max(id) FROM spool").fetchone()
            self._max_id = high
            self._count += len(rows)
            if self._count == len(rows):
                self._min_id = high - len(rows) + 1
            return self._trim()

    def meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def read(self, after_id: int, limit: int, now: float) -> tuple[int, list[tuple[int, Message]]]:
        """Up to ``limit`` rows with ids above ``after_id``, oldest first, after the last id read.

        A row whose message expiry ran out while spooled is deleted and counted
        in :attr:`expired` instead (the broker would discard it anyway).
        """
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain, expiry_s, spooled_at FROM spool"
            " WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        last = rows[-1][0] if rows else after_id
        out: list[tuple[int, Message]] = []
        dead: list[tuple[int]] = []
        for row_id, topic, payload, qos, retain, expiry_s, spooled_at in rows:
            left = None
            if expiry_s is not None:
                left = int(expiry_s - (now - spooled_at))
                if left <= 0:
                    dead.append((row_id,))
                    continue
            out.append((row_id, Message(topic, payload, qos, bool(retain), left)))
        if dead:
            with self._transaction():
                self._db.executemany("DELETE FROM spool WHERE id = ?", dead)
                self._count -= len(dead)
                self.expired += len(dead)
        return last, out

    def delete_through(self, row_id: int) -> None:
        """Remove every row with an id up to ``row_id`` (the broker has them)."""
        if not self._count or row_id < self._min_id:
            return
        with self._transaction():
            cursor = self._db.execute("DELETE FROM spool WHERE id <= ?", (row_id,))
            self._count -= cursor.rowcount
            self._min_id = row_id + 1

    def close(self) -> None:
        self._db.close()

    def _trim(self) -> int:
        excess = self._count - self.max_records
        if excess <= 0:
            return 0
        cut = self._db.execute(
            "SELECT id FROM spool ORDER BY id LIMIT 1 OFFSET ?", (excess - 1,)
        ).fetchone()[0]
        self._db.execute("DELETE FROM spool WHERE id <= ?", (cut,))
        self._count -= excess
        self._min_id = cut + 1
        return excess

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on error (the connection runs in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
