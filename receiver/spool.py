"""The MQTT spool: every message on disk, in order, until the broker has it.

One SQLite table of batches: each row holds the messages of one commit (up to
``BATCH_MAX``), packed with msgpack, under an AUTOINCREMENT id that is never
reused. A message is named by ``row id << INDEX_BITS | its index in the row``,
so ids grow in spool order and a reader's cursor stays valid while rows are
deleted behind it. One row per commit instead of one per message: at 50 000
updates/s the per-message INSERT, SELECT and DELETE were 30 % of the receiver
(py-spy); a batch costs one row whatever its size.

Messages leave the spool only when the broker has them (PUBACK for QoS 1,
written to the socket for QoS 0): :meth:`Spool.delete_through` removes the
rows whose every message is at or below an id. When the spool holds more
than ``max_records`` messages, the oldest go first, one by one (a row loses
its head: ``skip`` counts the messages gone from it), and the number dropped
is returned to the caller, which counts and logs it.

WAL with ``synchronous=NORMAL``: a commit survives the process dying (a crash,
SIGKILL, an OOM kill), the last commits may be lost if the machine loses
power; the fsync per commit that would cover that costs more than the spool
is for. The file survives a restart: a new spool on the same file starts with
what the old one left, and a spool of the one-row-per-message layout of
earlier versions is converted when it is opened.

A ``meta`` table beside it holds the receiver's stream positions, written in
the same transaction as the messages they cover, and a ``state`` table what
the router learned and must not forget across a restart (the catalogue, the
epoch, the samples waiting for their catalogue entry, the last values): rows
``(stream, kind, key) -> value`` the router encodes, changed by a
:class:`StateChanges` in that same transaction (receiver/router.py).

Each row keeps the wall-clock time it was spooled, so a message's MQTT 5
expiry counts the time spent here: :meth:`Spool.read` returns what is left of
it, zero or less when it ran out (the caller drops the message and counts it;
it leaves the spool with the next :meth:`Spool.delete_through`, like a
message sent).

**Reads from memory.** The rows appended last are also kept in memory (at
most :data:`RECENT_ROWS` rows, :data:`RECENT_MESSAGES` messages and
:data:`RECENT_BYTES` bytes, always the newest: a suffix of the table), so a
reader that keeps up with the writer never SELECTs and unpacks what it wrote
a few milliseconds before: at 50 000 updates/s that read was 18 % of the
receiver (py-spy). A reader behind them (a backlog after an outage, a spool
from before a restart) reads the table as before. The disk is still written
first: memory only spares the read.

**Bounded in bytes, not only in messages.** A commit's messages go into rows
of at most :data:`ROW_BYTES` of topics and payloads (and ``BATCH_MAX``
messages), and :meth:`Spool.read` stops at ``max_bytes``: so what the spool
holds in memory, packs, writes and reads back at once is bounded whatever a
message weighs. Counted in messages only, the 45 KB batched messages of
``diode bench link`` made an overrun receiver's commit of 350 blocks one
16 MB row, packed whole, kept whole in memory and handed to the pump whole;
256 rows of memory could have held gigabytes (docs/BENCHMARKS.md, the
receiver's memory under overrun).

**Large rows in data files.** A row whose packed messages exceed
:data:`TABLE_MAX_BYTES` (more than a 4 KiB page holds) keeps them in a data
file beside the database instead (``<spool>-data.<n>``, append-only, a new
one every :data:`DATA_FILE_BYTES`): the row holds the file, offset, length
and CRC-32 of its bytes, which are written (one ``pwrite``) before the
transaction that inserts the row commits, so a committed row's bytes are
always there after the process dies, whenever it dies. In SQLite each such
row cost a WAL frame (two writes and a checksum) per 4 KiB overflow page,
the checkpoint copied every page again, and the delete walked the chain: a
commit of two 48 KB blocks of ``diode bench link`` took 160-200 us of CPU
in SQLite, where one write of its 96 KB takes 15 (ext4; 39 when the write
extends the file, hence the preallocation). The receiver of that bench went
from 1 881 to 1 372 us per delivered block (commit f6b57d7's message). A file
is deleted once no committed row refers to it; a file no row refers to when
a spool opens (a write whose commit never came) is deleted then, but the last
(another spool open on the same file may be writing it). A row whose
bytes are short or fail their CRC (a power loss took them: the file is never
fsynced, like the WAL under ``synchronous=NORMAL``) is read as that many
messages expired at once, which the caller drops and counts, and
:attr:`Spool.damaged` counts them: never published wrong, never silent.

**Checkpoints off the event loop.** SQLite folds the WAL back into the
database file (a checkpoint, with its fsyncs) inside whichever COMMIT
crosses ``wal_autocheckpoint`` pages: 6 ms here, once or twice a second at
10 000 updates/s, and every message handed over meanwhile waited. The owner
calls :meth:`Spool.checkpoint` from a worker thread instead (its own
connection; SQLite lets a PASSIVE checkpoint run beside the writer) and
opens the spool with ``checkpoints_apart``: the automatic one then stays as
a backstop at :data:`AUTOCHECKPOINT_PAGES`. Other spools keep SQLite's.
The WAL is then restarted only when a checkpoint finished between two
commits, so its file may grow larger than before (at most to the backstop,
whose checkpoint in a COMMIT restarts it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path

import msgpack
from isal.isal_zlib import crc32  # zlib's CRC-32 (the data files already written), by ISA-L

from receiver.payload import Message

INDEX_BITS = 12
BATCH_MAX = 1 << INDEX_BITS  # messages in one row
_INDEX_MASK = BATCH_MAX - 1
RECENT_ROWS = 256  # newest rows kept in memory for read()
RECENT_MESSAGES = 65_536  # ... and at most this many messages in them
RECENT_BYTES = 8 << 20  # ... and of topic and payload bytes (100 ms of 600 Mb/s of goodput)
# A row's messages: at most this many bytes of topics and payloads (one message more if
# it is larger), so a row is packed, written and read back in pieces of about this size.
ROW_BYTES = 1 << 20
# SQLite's own checkpoint (in a COMMIT, on the event loop) past this many WAL pages
# (4 KiB each), for an owner that calls checkpoint(): a backstop for when it does not
# often enough. A spool whose owner never calls it keeps SQLite's default (1 000).
AUTOCHECKPOINT_PAGES = 16_384
# A row's packed messages past this many bytes go to a data file, not the table: more
# than a 4 KiB page holds, which SQLite would write as a chain of overflow pages.
TABLE_MAX_BYTES = 4000
DATA_FILE_BYTES = 16 << 20  # a data file takes no more rows past this size

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    count INTEGER NOT NULL,
    skip INTEGER NOT NULL DEFAULT 0,
    spooled_at REAL NOT NULL,
    messages BLOB NOT NULL,
    -- Set when the messages are in a data file (messages is then empty): which, where.
    file_no INTEGER,
    file_at INTEGER,
    file_len INTEGER,
    file_crc INTEGER
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    stream INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    key INTEGER NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (stream, kind, key)
) WITHOUT ROWID;
"""

_Row = tuple[int, int, int, float, Sequence[Message]]  # id, count, skip, spooled_at, messages
_FILE_COLUMNS = ("file_no", "file_at", "file_len", "file_crc")
# What a row whose bytes a power loss took reads as: expired, so dropped and counted.
_LOST = Message("", b"", 0, False, 0)


@dataclass(slots=True)
class _Recent:
    """A row appended lately, in memory: what ``batches`` holds for it."""

    count: int
    skip: int
    spooled_at: float
    messages: Sequence[Message]
    size: int = 0  # bytes of its topics and payloads


def message_bytes(m: Message) -> int:
    """What a message weighs for the spool's byte bounds: its topic and payload."""
    return len(m.topic) + len(m.payload)


def _fitting(messages: Sequence[Message], first: int, end: int, budget: int) -> tuple[int, int]:
    """Where a read of ``messages[first:end]`` with ``budget`` bytes left stops (it takes
    the message that reaches the budget, so always one at least), and what is left (0:
    the budget is spent)."""
    for i in range(first, end):
        budget -= message_bytes(messages[i])
        if budget <= 0:
            return i + 1, 0
    return end, budget


def _rows(messages: Sequence[Message]) -> Iterator[tuple[Sequence[Message], int]]:
    """``messages`` cut into rows of at most ``BATCH_MAX`` messages and ``ROW_BYTES`` bytes
    (a message larger than that alone); each with its size."""
    start, size = 0, 0
    for i, m in enumerate(messages):
        weight = message_bytes(m)
        if i > start and (size + weight > ROW_BYTES or i - start >= BATCH_MAX):
            yield messages[start:i], size
            start, size = i, 0
        size += weight
    if start < len(messages):
        yield messages[start:], size


def _pack(messages: Sequence[Message]) -> bytes:
    return msgpack.packb(messages, use_bin_type=True)


def _unpack(blob: bytes) -> list[Message]:
    return list(map(Message._make, msgpack.unpackb(blob, use_list=False, raw=False)))


def _aged(m: Message, spooled_s: float) -> Message:
    """``m`` with what is left of its expiry after ``spooled_s`` in the spool."""
    if m.expiry_s is None:
        return m
    return m._replace(expiry_s=int(m.expiry_s - spooled_s))


StateKey = tuple[int, int, int]  # stream, kind, key


@dataclass(slots=True)
class StateChanges:
    """Changes to the ``state`` table, applied in order: ``clear``, ``delete``, ``put``.

    Built up between two commits: :meth:`clear_stream` drops what was queued
    for that stream before it, a delete cancels a queued put and a put a
    queued delete, so applying the three sets in that order gives the result
    of the calls in the order they were made.
    """

    clear: set[int] = field(default_factory=set)
    delete: set[StateKey] = field(default_factory=set)
    put: dict[StateKey, bytes] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.clear or self.delete or self.put)

    def set(self, key: StateKey, value: bytes) -> None:
        self.delete.discard(key)
        self.put[key] = value

    def remove(self, key: StateKey) -> None:
        self.put.pop(key, None)
        self.delete.add(key)

    def clear_stream(self, stream: int) -> None:
        self.clear.add(stream)
        self.delete = {k for k in self.delete if k[0] != stream}
        self.put = {k: v for k, v in self.put.items() if k[0] != stream}

    def merge(self, later: StateChanges) -> None:
        """Add ``later``'s changes after these."""
        for stream in later.clear:
            self.clear_stream(stream)
        for key in later.delete:
            self.remove(key)
        for key, value in later.put.items():
            self.set(key, value)


class Spool:
    """A bounded, ordered, persistent queue of MQTT messages."""

    def __init__(self, path: Path, max_records: int, *, checkpoints_apart: bool = False) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_records = max_records
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if checkpoints_apart:  # the owner calls checkpoint() from a worker thread
            self._db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        self._db.executescript(_SCHEMA)
        self._add_file_columns()
        self._recent: dict[int, _Recent] = {}  # row id -> row, ascending: the newest rows
        self._recent_messages = 0
        self._recent_bytes = 0
        # Every row of the table that memory lacks has an id at most this (0: none; ids start at 1).
        self._unrecorded = 2**62
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()
        self._closed = False
        self.damaged = 0  # messages whose bytes were not in their data file (power loss)
        self._damaged_rows: set[int] = set()
        # Data files: the one being written (opened on first use), the oldest that may exist.
        self._oldest_file, last = self._drop_unreferenced_files()
        self._file_no, self._file_end = last + 1, 0
        self._file_fd: int | None = None
        self._reader: tuple[int, int] | None = None  # (file number, fd) read last
        self._convert_one_row_per_message()
        self._unrecorded = self._max_row_id()  # what an earlier process left: read from disk
        (count,) = self._db.execute("SELECT coalesce(sum(count - skip), 0) FROM batches").fetchone()
        self._count: int = count

    def __len__(self) -> int:
        return self._count

    def append(
        self,
        messages: Sequence[Message],
        now: float,
        meta: Mapping[str, bytes] | None = None,
        state: StateChanges | None = None,
        delete_through: int | None = None,
    ) -> int:
        """Add ``messages`` after every row, set ``meta``, change ``state``, in one transaction.

        Returns the number of oldest messages dropped to fit. Whatever ``meta``
        and ``state`` say (the receiver's stream positions, what the router
        learned) is on disk exactly when the messages are. ``delete_through``:
        :meth:`delete_through` in the same transaction (one COMMIT, not two).
        """
        if not messages and not meta and not state and delete_through is None:
            return 0
        with self._transaction():
            if delete_through is not None:
                self._delete_through(delete_through)
            if state:
                self._change_state(state)
            if meta:
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items()
                )
            if not messages:
                return 0
            for chunk, size in _rows(messages):
                packed = _pack(chunk)
                if len(packed) <= TABLE_MAX_BYTES:
                    row = self._db.execute(
                        "INSERT INTO batches (count, spooled_at, messages) VALUES (?, ?, ?)",
                        (len(chunk), now, packed),
                    )
                else:  # its bytes on file before the row that points at them commits
                    row = self._db.execute(
                        "INSERT INTO batches (count, spooled_at, messages, file_no, file_at,"
                        " file_len, file_crc) VALUES (?, ?, x'', ?, ?, ?, ?)",
                        (len(chunk), now, *self._write_data(packed)),
                    )
                assert row.lastrowid is not None  # an INSERT into a rowid table
                # In memory as in the table (a rollback forgets it: _transaction).
                self._remember(row.lastrowid, _Recent(len(chunk), 0, now, chunk, size))
            self._count += len(messages)
            return self._trim()

    def _remember(self, row_id: int, row: _Recent) -> None:
        recent = self._recent
        if recent and row_id <= next(reversed(recent)):
            return  # never: ids only grow; memory must stay the table's newest rows
        recent[row_id] = row
        self._recent_messages += row.count
        self._recent_bytes += row.size
        while recent and (
            len(recent) > RECENT_ROWS
            or self._recent_messages > RECENT_MESSAGES
            or self._recent_bytes > RECENT_BYTES
        ):
            oldest = next(iter(recent))
            self._forget_recent(oldest)  # still in the table: read from there
            self._unrecorded = max(self._unrecorded, oldest)

    def _max_row_id(self) -> int:
        (row_id,) = self._db.execute("SELECT coalesce(max(id), 0) FROM batches").fetchone()
        return int(row_id)

    def _forget_recent(self, row_id: int) -> None:
        row = self._recent.pop(row_id, None)
        if row is not None:
            self._recent_messages -= row.count
            self._recent_bytes -= row.size

    def state(self) -> list[tuple[int, int, int, bytes]]:
        """Every ``(stream, kind, key, value)`` of the state table, in key order."""
        rows = self._db.execute(
            "SELECT stream, kind, key, value FROM state ORDER BY stream, kind, key"
        )
        return [(s, k, i, bytes(v)) for s, k, i, v in rows]

    def _change_state(self, state: StateChanges) -> None:
        db = self._db
        db.executemany("DELETE FROM state WHERE stream = ?", ((s,) for s in state.clear))
        db.executemany("DELETE FROM state WHERE stream = ? AND kind = ? AND key = ?", state.delete)
        db.executemany(
            "INSERT OR REPLACE INTO state (stream, kind, key, value) VALUES (?, ?, ?, ?)",
            ((s, k, i, v) for (s, k, i), v in state.put.items()),
        )

    def meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def read(
        self, after_id: int, limit: int, now: float, max_bytes: int | None = None
    ) -> tuple[int, list[tuple[int, Message]]]:
        """Up to ``limit`` messages with ids above ``after_id``, oldest first; the last id read.

        ``max_bytes``: stop at the message that reaches this many bytes of topics and
        payloads (at least one message is read). A message with an expiry carries what is
        left of it: zero or less when it ran out while spooled.
        """
        last = after_id
        out: list[tuple[int, Message]] = []
        if limit <= 0:
            return last, out
        start = after_id >> INDEX_BITS
        # Memory holds the newest rows; a reader that needs none of the others reads there.
        rows = (
            self._recent_from(start) if self._unrecorded < max(start, 1) else self._rows_from(start)
        )
        for row_id, count, skip, spooled_at, messages in rows:
            base = row_id << INDEX_BITS
            first = max(skip, after_id - base + 1)
            end = min(count, first + limit - len(out))
            if end <= first:
                continue
            if max_bytes is not None:
                end, max_bytes = _fitting(messages, first, end, max_bytes)
            if any(m.expiry_s is not None for m in messages[first:end]):
                out.extend(
                    (base | i, _aged(messages[i], now - spooled_at)) for i in range(first, end)
                )
            else:
                out.extend(zip(range(base + first, base + end), messages[first:end], strict=True))
            last = base | (end - 1)
            if len(out) == limit or max_bytes == 0:
                return last, out
        return last, out

    def _recent_from(self, row_id: int) -> Iterator[_Row]:
        for key, row in list(self._recent.items()):
            if key >= row_id:
                yield key, row.count, row.skip, row.spooled_at, row.messages

    def delete_through(self, message_id: int) -> None:
        """Remove every message with an id up to ``message_id`` (the broker has them)."""
        if not self._count:
            return
        with self._transaction():
            self._delete_through(message_id)

    def _delete_through(self, message_id: int) -> None:
        if not self._count:
            return
        row_id, index = message_id >> INDEX_BITS, message_id & _INDEX_MASK
        (gone,) = self._db.execute(
            "SELECT coalesce(sum(count - skip), 0) FROM batches WHERE id < ?", (row_id,)
        ).fetchone()
        self._db.execute("DELETE FROM batches WHERE id < ?", (row_id,))
        for key in [k for k in self._recent if k < row_id]:
            self._forget_recent(key)
        if self._damaged_rows:  # the rows gone need no memory of having been counted
            self._damaged_rows = {k for k in self._damaged_rows if k >= row_id}
        if self._unrecorded < row_id:
            self._unrecorded = 0  # every row memory lacked is gone
        row = self._db.execute("SELECT count, skip FROM batches WHERE id = ?", (row_id,)).fetchone()
        if row is not None and index >= row[1]:
            count, skip = row
            if index + 1 >= count:
                self._db.execute("DELETE FROM batches WHERE id = ?", (row_id,))
                self._forget_recent(row_id)
                if self._unrecorded == row_id:
                    self._unrecorded = 0
            else:
                self._db.execute("UPDATE batches SET skip = ? WHERE id = ?", (index + 1, row_id))
                if (kept := self._recent.get(row_id)) is not None:
                    kept.skip = index + 1
            gone += min(index + 1, count) - skip
        self._count -= gone

    def checkpoint(self) -> None:
        """Fold the WAL back into the database file; for a worker thread, not the event loop.

        PASSIVE: it copies what no reader needs and never waits for the writer,
        which goes on committing meanwhile. Its own connection, opened on first use.
        """
        with self._checkpoint_lock:
            if self._closed:
                return
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def close(self) -> None:
        with self._checkpoint_lock:
            self._closed = True
            if self._checkpointer is not None:
                self._checkpointer.close()
        self._db.close()
        self._close_reader()
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._file_fd = None

    def _rows_from(self, row_id: int) -> Iterator[_Row]:
        cursor = self._db.execute(
            "SELECT id, count, skip, spooled_at, messages, file_no, file_at, file_len, file_crc"
            " FROM batches WHERE id >= ? ORDER BY id",
            (row_id,),
        )
        try:
            while rows := cursor.fetchmany(8):  # a read needs a few rows; each holds a batch
                for key, count, skip, spooled_at, blob, *where in rows:
                    if where[0] is None:
                        yield key, count, skip, spooled_at, _unpack(blob)
                    else:
                        yield key, count, skip, spooled_at, self._read_data(key, count, where)
        finally:
            cursor.close()

    # -- data files ------------------------------------------------------------------

    def _data_path(self, file_no: int) -> Path:
        return self.path.with_name(f"{self.path.name}-data.{file_no}")

    def _data_files(self) -> dict[int, Path]:
        """Every data file beside the database, by number."""
        prefix = f"{self.path.name}-data."
        found = {}
        for path in self.path.parent.glob(f"{glob_escape(prefix)}*"):
            number = path.name[len(prefix) :]
            if number.isdigit():
                found[int(number)] = path
        return found

    def _drop_unreferenced_files(self) -> tuple[int, int]:
        """Delete the data files no row refers to (written, never committed), but the last.

        The last may be another spool's on the same file, which writes there before
        it commits (a reader opened beside the receiver's: the tests do); once this
        spool writes a later one, :meth:`_drop_delivered_files` deletes it. Returns
        the oldest file there is, and the highest number seen (0: none), so that a
        new file never takes the number of an old one.
        """
        rows = self._db.execute("SELECT DISTINCT file_no FROM batches WHERE file_no IS NOT NULL")
        used = {int(n) for (n,) in rows}
        files = self._data_files()
        last = max(files.keys() | used, default=0)
        for number, path in files.items():
            if number not in used and number != last:
                path.unlink(missing_ok=True)
        kept = used | ({last} & files.keys())
        return min(kept, default=last + 1), last

    def _write_data(self, packed: bytes) -> tuple[int, int, int, int]:
        """Append ``packed`` to the data file being written: (file number, offset, length, CRC)."""
        if self._file_fd is None or self._file_end >= DATA_FILE_BYTES:
            if self._file_fd is not None:
                os.close(self._file_fd)
                self._file_fd = None
                self._file_no += 1
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
            self._file_fd = os.open(self._data_path(self._file_no), flags, 0o600)
            self._file_end = 0
            # Allocated at once: a write that extends the file cost 2.6 times one that
            # does not (ext4 here, 96 KB writes: 39 against 15 us).
            with contextlib.suppress(OSError):  # not every file system can: then as it comes
                os.posix_fallocate(self._file_fd, 0, DATA_FILE_BYTES)
        at = self._file_end
        # Past a failed write the bytes are never referred to: the offset moves on anyway.
        self._file_end += len(packed)
        if os.pwrite(self._file_fd, packed, at) != len(packed):
            raise OSError(f"short write to {self._data_path(self._file_no)}")
        return self._file_no, at, len(packed), crc32(packed)

    def _read_data(self, row_id: int, count: int, where: Sequence[int]) -> Sequence[Message]:
        """A row's messages from its data file (``where``: file number, offset, length and
        CRC); if its bytes are gone, ``count`` expired ones."""
        file_no, at, length, crc = where
        try:
            if self._reader is None or self._reader[0] != file_no:
                self._close_reader()
                flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
                self._reader = (file_no, os.open(self._data_path(file_no), flags))
            data = os.pread(self._reader[1], length, at)
        except FileNotFoundError:
            data = b""
        if len(data) == length and crc32(data) == crc:
            return _unpack(data)
        if row_id not in self._damaged_rows:  # counted once, however often it is read
            self._damaged_rows.add(row_id)
            self.damaged += count
        return [_LOST] * count

    def _close_reader(self) -> None:
        if self._reader is not None:
            os.close(self._reader[1])
            self._reader = None

    def _drop_delivered_files(self) -> None:
        """Delete the data files older than every committed row's (after a COMMIT)."""
        if self._oldest_file >= self._file_no:
            return  # only the file being written: it stays
        row = self._db.execute(
            "SELECT file_no FROM batches WHERE file_no IS NOT NULL ORDER BY id LIMIT 1"
        ).fetchone()
        keep = self._file_no if row is None else min(row[0], self._file_no)
        for number in range(self._oldest_file, keep):
            if self._reader is not None and self._reader[0] == number:
                self._close_reader()
            self._data_path(number).unlink(missing_ok=True)
        self._oldest_file = max(self._oldest_file, keep)

    def _add_file_columns(self) -> None:
        """A spool from before data files: its table gains their columns (NULL: in the row)."""
        have = {name for _, name, *_ in self._db.execute("PRAGMA table_info(batches)")}
        for column in _FILE_COLUMNS:
            if column not in have:
                self._db.execute(f"ALTER TABLE batches ADD COLUMN {column} INTEGER")

    def _trim(self) -> int:
        excess = self._count - self.max_records
        if excess <= 0:
            return 0
        left, gone, cut = excess, [], None
        oldest = self._db.execute("SELECT id, count, skip FROM batches ORDER BY id")
        for row_id, count, skip in oldest:
            held = count - skip
            if held > left:
                cut = (skip + left, row_id)
                break
            gone.append((row_id,))
            left -= held
            if not left:
                break
        oldest.close()
        self._db.executemany("DELETE FROM batches WHERE id = ?", gone)
        for (row_id,) in gone:
            self._forget_recent(row_id)
        if gone and gone[-1][0] >= self._unrecorded:
            self._unrecorded = 0  # the oldest rows went first: every one memory lacked
        if cut is not None:
            self._db.execute("UPDATE batches SET skip = ? WHERE id = ?", cut)
            if (kept := self._recent.get(cut[1])) is not None:
                kept.skip = cut[0]
        self._count -= excess
        return excess

    def _convert_one_row_per_message(self) -> None:
        """Move the messages of an earlier version's ``spool`` table into batches, in order."""
        (old,) = self._db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'spool'"
        ).fetchone()
        if not old:
            return
        with self._transaction():
            rows = self._db.execute(
                "SELECT topic, payload, qos, retain, expiry_s, spooled_at FROM spool ORDER BY id"
            )
            batch: list[Message] = []
            batch_at: float | None = None
            insert = "INSERT INTO batches (count, spooled_at, messages) VALUES (?, ?, ?)"
            for topic, payload, qos, retain, expiry_s, spooled_at in rows:
                if batch and (spooled_at != batch_at or len(batch) == BATCH_MAX):
                    self._db.execute(insert, (len(batch), batch_at, _pack(batch)))
                    batch = []
                batch_at = spooled_at
                batch.append(Message(topic, bytes(payload), qos, bool(retain), expiry_s))
            if batch:
                self._db.execute(insert, (len(batch), batch_at, _pack(batch)))
            self._db.execute("DROP TABLE spool")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            with _Transaction(self._db):
                yield
        except BaseException:
            # Rolled back: what memory holds may no longer be what the table does.
            self._recent.clear()
            self._recent_messages = 0
            self._unrecorded = 2**62  # read the table until every row it holds is gone
            with contextlib.suppress(sqlite3.Error):
                self._unrecorded = self._max_row_id()
            raise
        self._drop_delivered_files()


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on error (the connection runs in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
