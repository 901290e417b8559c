"""The SQLite spool: order, bound, persistence, expiry."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.payload import Message
from receiver.spool import (
    BATCH_MAX,
    DATA_FILE_BYTES,
    RECENT_BYTES,
    RECENT_ROWS,
    ROW_BYTES,
    TABLE_MAX_BYTES,
    Spool,
    _pack,
)


def msgs(*names: str, expiry: int | None = None, pad: int = 0) -> list[Message]:
    """Messages named ``names``; ``pad`` bytes more in each payload (large rows: data files)."""
    return [Message(f"t/{n}", n.encode() + b"." * pad, 1, True, expiry) for n in names]


def payloads(spool: Spool) -> list[bytes]:
    _, rows = spool.read(-(2**62), 10_000, 0.0)
    return [m.payload for _, m in rows]


def test_order_and_delete_through(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 100)
    spool.append(msgs("a", "b", "c"), 0.0)
    last, rows = spool.read(-(2**62), 2, 0.0)
    assert [m.payload for _, m in rows] == [b"a", b"b"]
    assert last == rows[-1][0]
    _, rest = spool.read(last, 10, 0.0)
    assert [m.payload for _, m in rest] == [b"c"]
    spool.delete_through(last)
    assert len(spool) == 1
    assert payloads(spool) == [b"c"]


def test_what_the_broker_has_is_deleted_in_the_next_commits_transaction(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 100)
    spool.append(msgs("a", "b"), 0.0)
    last, _ = spool.read(-(2**62), 1, 0.0)  # the broker has a
    commits = []
    spool._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    spool.append(msgs("c"), 0.0, {"positions": b"p"}, delete_through=last)
    assert commits == ["COMMIT"]  # one transaction for both
    assert len(spool) == 2
    assert payloads(spool) == [b"b", b"c"]
    _, rows = spool.read(-(2**62), 10, 0.0)
    spool.append([], 0.0, delete_through=rows[-1][0])  # nothing new: the delete alone
    spool.close()
    again = Spool(tmp_path / "s.db", 100)
    assert len(again) == 0
    assert again.meta("positions") == b"p"


def test_full_drops_the_oldest_with_exact_count(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 5)
    assert spool.append(msgs("1", "2", "3"), 0.0) == 0
    assert spool.append(msgs("4", "5", "6", "7"), 0.0) == 2
    assert payloads(spool) == [b"3", b"4", b"5", b"6", b"7"]
    assert spool.append(msgs(*[str(i) for i in range(8, 20)]), 0.0) == 12
    assert payloads(spool) == [b"15", b"16", b"17", b"18", b"19"]


def test_meta_is_committed_with_the_messages_and_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 100)
    assert spool.meta("positions") is None
    spool.append(msgs("a"), 0.0, {"positions": b"one"})
    spool.append([], 0.0, {"positions": b"two"})
    spool.close()
    again = Spool(tmp_path / "s.db", 100)
    assert again.meta("positions") == b"two"
    assert payloads(again) == [b"a"]


def test_survives_reopen_and_ids_are_not_reused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 100)
    spool.append(msgs("a", "b"), 0.0)
    last, _ = spool.read(-(2**62), 10, 0.0)
    spool.delete_through(last)
    spool.append(msgs("c"), 0.0)
    spool.close()
    again = Spool(tmp_path / "s.db", 100)
    assert len(again) == 1
    _, rows = again.read(last, 10, 0.0)
    assert [m.payload for _, m in rows] == [b"c"]
    again.append(msgs("d"), 0.0)
    assert payloads(again) == [b"c", b"d"]


def test_expiry_counts_time_in_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 100)
    spool.append(msgs("old", expiry=10), 100.0)
    spool.append(msgs("new", "none"), 105.0)
    spool.append(msgs("newer", expiry=10), 105.0)
    _, rows = spool.read(-(2**62), 10, 112.0)
    # What is left of each expiry; the caller drops what ran out (<= 0).
    assert [(m.payload, m.expiry_s) for _, m in rows] == [
        (b"old", -2),
        (b"new", None),
        (b"none", None),
        (b"newer", 3),
    ]


def test_ids_grow_across_and_within_batches(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 100)
    spool.append(msgs("a", "b"), 0.0)
    spool.append(msgs("c"), 0.0)
    spool.append(msgs("d", "e", "f"), 0.0)
    ids = []
    cursor = -(2**62)
    while True:  # one message at a time: a read may stop inside a batch
        cursor, rows = spool.read(cursor, 1, 0.0)
        if not rows:
            break
        ids.append(rows[0][0])
    assert ids == sorted(ids)
    assert len(set(ids)) == 6


def test_delete_through_inside_a_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 100)
    spool.append(msgs("a", "b", "c"), 0.0)
    spool.append(msgs("d"), 0.0)
    _, rows = spool.read(-(2**62), 10, 0.0)
    spool.delete_through(rows[1][0])  # a and b
    assert len(spool) == 2
    assert payloads(spool) == [b"c", b"d"]
    spool.delete_through(rows[1][0])  # again: nothing more
    assert len(spool) == 2
    spool.delete_through(rows[3][0])
    assert len(spool) == 0
    assert payloads(spool) == []


def test_a_batch_larger_than_a_row_keeps_its_order(tmp_path: Path) -> None:
    n = BATCH_MAX * 2 + 5
    spool = Spool(tmp_path / "s.db", 10 * n)
    spool.append(msgs(*[str(i) for i in range(n)]), 0.0)
    assert len(spool) == n
    assert payloads(spool) == [str(i).encode() for i in range(n)]


def test_a_spool_of_one_row_per_message_is_converted(tmp_path: Path) -> None:
    # The layout before batches: what a receiver of an earlier version left on disk.
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
        " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,"
        " expiry_s INTEGER, spooled_at REAL NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);"
    )
    db.executemany(
        "INSERT INTO spool (topic, payload, qos, retain, expiry_s, spooled_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [
            ("t/a", b"a", 0, 1, None, 1.0),
            ("t/b", b"b", 1, 0, 60, 1.0),
            ("t/c", b"c", 1, 1, 60, 2.0),
        ],
    )
    db.execute("INSERT INTO meta VALUES ('positions', x'01')")
    db.commit()
    db.close()
    spool = Spool(path, 100)
    assert len(spool) == 3
    assert spool.meta("positions") == b"\x01"
    _, rows = spool.read(-(2**62), 10, 2.0)
    assert [m for _, m in rows] == [
        Message("t/a", b"a", 0, True, None),
        Message("t/b", b"b", 1, False, 59),
        Message("t/c", b"c", 1, True, 60),
    ]


# -- the newest rows read from memory (receiver/spool.py, "Reads from memory") ----------------

_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.integers(0, 9),
            st.sampled_from([None, 30, 0]),
            st.sampled_from([0, TABLE_MAX_BYTES // 3]),  # rows in the table, or in a data file
        ),
        st.tuples(st.just("read"), st.integers(1, 12), st.none(), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 12), st.none(), st.just(0)),
    ),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS)
def test_reads_from_memory_are_the_reads_of_the_table(tmp_path_factory: Any, ops: Any) -> None:
    """Any appends, trims, deletes and reads: what a reader gets from the spool's memory is
    what a spool opened on the same file (no memory) reads, message for message."""
    path = tmp_path_factory.mktemp("s") / "s.db"
    spool = Spool(path, 17)  # small: appends trim the oldest rows and cut into them
    cursor = -(2**62)
    serial = 0
    try:
        for op, n, expiry, pad in ops:
            if op == "append":
                names = [str(serial + i) for i in range(n)]
                serial += n
                spool.append(msgs(*names, expiry=expiry, pad=pad), float(serial))
            elif op == "read":
                cursor, _ = spool.read(cursor, n, float(serial))
            else:
                _, head = spool.read(-(2**62), n, 0.0)
                if head:
                    spool.delete_through(head[-1][0])
            disk = Spool(path, 17)
            try:
                for after in (-(2**62), cursor):
                    assert spool.read(after, 50, 99.0) == disk.read(after, 50, 99.0)
                assert len(spool) == len(disk)
            finally:
                disk.close()
    finally:
        spool.close()


def test_a_reader_that_keeps_up_reads_no_row_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 10_000)
    selects: list[str] = []
    spool._db.set_trace_callback(lambda sql: selects.append(sql) if "FROM batches" in sql else None)
    cursor = -(2**62)
    for i in range(50):
        spool.append(msgs(*[f"{i}.{j}" for j in range(20)]), 0.0)
        cursor, rows = spool.read(cursor, 1000, 0.0)
        assert [m.payload for _, m in rows] == [f"{i}.{j}".encode() for j in range(20)]
    assert [s for s in selects if s.startswith("SELECT")] == []
    assert len(payloads(spool)) == 1000  # memory holds every row: no SELECT either
    assert [s for s in selects if s.startswith("SELECT")] == []
    # More rows than memory keeps: a reader behind them reads the table, as before.
    for i in range(RECENT_ROWS):
        spool.append(msgs(f"late {i}"), 0.0)
    assert len(payloads(spool)) == 1000 + RECENT_ROWS
    assert any(s.startswith("SELECT") for s in selects)


def _big(prefix: str, count: int, size: int) -> list[Message]:
    return [
        Message(f"t/{prefix}{i}", f"{prefix}{i}:".encode().ljust(size, b"."), 0, False)
        for i in range(count)
    ]


def test_a_commit_of_heavy_messages_is_cut_into_rows_of_row_bytes(tmp_path: Path) -> None:
    """An overrun receiver delivers hundreds of blocks at once (the waiting room released):
    at 45 KB a batched message, one commit of 350 was a 16 MB row, packed, written, kept
    and read back whole."""
    spool = Spool(tmp_path / "s.db", 10_000)
    heavy = _big("a", 200, 45_000)
    spool.append(heavy, 0.0)
    rows = spool._db.execute("SELECT count FROM batches ORDER BY id").fetchall()
    assert len(rows) >= 200 * 45_000 // ROW_BYTES
    assert max(count for (count,) in rows) * 45_000 <= ROW_BYTES + 45_000
    assert payloads(spool) == [m.payload for m in heavy]
    alone = _big("b", 2, 3 * ROW_BYTES)  # a message over ROW_BYTES: a row of its own
    spool.append(alone, 0.0)
    assert payloads(spool)[200:] == [m.payload for m in alone]


def test_memory_keeps_at_most_recent_bytes_of_rows(tmp_path: Path) -> None:
    """256 rows of memory were 256 commits whatever they weighed: 94 MB of batched
    messages when the broker lags a second at 600 Mb/s. Past RECENT_BYTES the oldest
    rows are read from the table, and read right."""
    spool = Spool(tmp_path / "s.db", 10_000)
    written: list[bytes] = []
    for i in range(100):
        commit = _big(f"{i}.", 4, 50_000)
        spool.append(commit, 0.0)
        written += [m.payload for m in commit]
        held = sum(len(m.payload) for row in spool._recent.values() for m in row.messages)
        assert held <= RECENT_BYTES
    assert len(spool._recent) < 100  # some rows are only on disk
    assert payloads(spool) == written


def test_a_read_stops_at_max_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", 10_000)
    spool.append(_big("a", 10, 300_000), 0.0)
    spool.append(_big("b", 10, 300_000), 0.0)
    cursor, got = spool.read(-(2**62), 1000, 0.0, max_bytes=1_000_000)
    assert [m.topic for _, m in got] == ["t/a0", "t/a1", "t/a2", "t/a3"]  # the 4th reaches it
    cursor, got = spool.read(cursor, 1000, 0.0, max_bytes=1_000_000)
    assert [m.topic for _, m in got] == ["t/a4", "t/a5", "t/a6", "t/a7"]
    cursor, got = spool.read(cursor, 1000, 0.0, max_bytes=1_000_000)
    assert [m.topic for _, m in got] == ["t/a8", "t/a9", "t/b0", "t/b1"]  # across rows
    cursor, got = spool.read(cursor, 1000, 0.0, max_bytes=1)
    assert [m.topic for _, m in got] == ["t/b2"]  # one at least
    _, got = spool.read(cursor, 3, 0.0, max_bytes=10**9)
    assert [m.topic for _, m in got] == ["t/b3", "t/b4", "t/b5"]  # the count still bounds


def _commits_a_few_ms_apart(path: Path, *, checkpoints: bool) -> tuple[int, list[bytes]]:
    """The receiver's pattern: commits a few ms apart, what the broker has deleted; and
    :meth:`Spool.checkpoint` from a worker thread or not. The database file's size (what
    checkpoints folded into it), and what is left."""
    spool = Spool(path, 1_000_000, checkpoints_apart=True)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            spool.checkpoint()
            time.sleep(0.02)

    worker = threading.Thread(target=run)
    if checkpoints:
        worker.start()
    delivered = -(2**62)
    try:
        for i in range(400):
            # Rows the table holds (under TABLE_MAX_BYTES): their pages go through the WAL.
            spool.append(msgs(*[f"{i}.{j}" * 4 for j in range(50)]), 0.0)
            delivered, _ = spool.read(delivered, 49, 0.0)  # one left each time
            spool.delete_through(delivered)
            time.sleep(0.002)
    finally:
        stop.set()
        if checkpoints:
            worker.join()
    left = payloads(spool)
    folded = path.stat().st_size
    spool.close()  # the last connection: SQLite folds the WAL in and deletes it
    spool.checkpoint()  # closed: nothing, no error
    return folded, left


def test_a_checkpoint_from_another_thread_beside_the_writer(tmp_path: Path) -> None:
    """The receiver checkpoints from a worker thread while the loop commits (SQLite's own
    waits for 16 384 pages then): the WAL is folded into the database file meanwhile, and
    nothing is lost."""
    folded, left = _commits_a_few_ms_apart(tmp_path / "a.db", checkpoints=True)
    folded_alone, _ = _commits_a_few_ms_apart(tmp_path / "b.db", checkpoints=False)
    assert folded_alone < 64 * 1024  # nothing folded in: everything still in the WAL
    assert folded > 10 * folded_alone
    assert len(left) == 400
    again = Spool(tmp_path / "a.db", 1_000_000)
    assert payloads(again) == left
    again.close()


# -- large rows in data files (receiver/spool.py, "Large rows in data files") ---------------


def data_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.glob(f"{path.name}-data.*"))


def test_large_rows_go_to_a_data_file_and_read_back_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = Spool(path, 1000)
    spool.append(msgs("small"), 1.0)
    spool.append(msgs("a", "b", expiry=60, pad=TABLE_MAX_BYTES), 1.0)
    assert data_files(path) == ["s.db-data.1"]
    (in_row,) = spool._db.execute("SELECT count(*) FROM batches WHERE file_no IS NULL").fetchone()
    assert in_row == 1
    spool.close()
    again = Spool(path, 1000)
    _, rows = again.read(-(2**62), 10, 11.0)
    assert [m for _, m in rows] == [
        *msgs("small"),
        *msgs("a", "b", expiry=50, pad=TABLE_MAX_BYTES),
    ]
    assert again.damaged == 0
    # Once delivered, the file goes with the last row that refers to it; a spool writes
    # a new file, never into one a killed writer may have left half a row in.
    again.delete_through(rows[-1][0])
    assert data_files(path) == []
    again.append(msgs("c", pad=TABLE_MAX_BYTES), 2.0)
    assert data_files(path) == ["s.db-data.2"]
    again.close()


def test_a_data_file_goes_once_no_row_refers_to_it(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = Spool(path, 10_000)
    big = msgs("x", pad=DATA_FILE_BYTES // 3)
    for _ in range(4):  # past DATA_FILE_BYTES: a second file, then a third
        spool.append(big, 0.0)
    assert data_files(path) == ["s.db-data.1", "s.db-data.2"]
    _, rows = spool.read(-(2**62), 3, 0.0)
    spool.delete_through(rows[2][0])  # the three rows of file 1
    assert data_files(path) == ["s.db-data.2"]
    assert [m.payload for m in payloads_of(spool)] == [big[0].payload]
    spool.close()


def payloads_of(spool: Spool) -> list[Message]:
    _, rows = spool.read(-(2**62), 10_000, 0.0)
    return [m for _, m in rows]


def test_bytes_written_for_a_row_that_never_committed_are_never_read(tmp_path: Path) -> None:
    """A transaction that fails after its row's bytes are on file (here a real SQLite error,
    as a kill before the COMMIT would leave them): later rows are read right, and a spool
    opened on the file deletes a data file no row refers to."""
    path = tmp_path / "s.db"
    spool = Spool(path, 1000)
    spool._db.execute(
        "CREATE TEMP TRIGGER refuse BEFORE INSERT ON batches WHEN NEW.count = 3"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    spool.append(msgs("a", pad=TABLE_MAX_BYTES), 0.0)
    try:
        spool.append(msgs("lost1", "lost2", "lost3", pad=TABLE_MAX_BYTES), 0.0)
    except sqlite3.IntegrityError:
        pass
    else:
        raise AssertionError("the trigger did not refuse the row")
    spool.append(msgs("b", pad=TABLE_MAX_BYTES), 0.0)
    assert [m.payload[:1] for m in payloads_of(spool)] == [b"a", b"b"]
    _, rows = spool.read(-(2**62), 10, 0.0)
    spool.delete_through(rows[-1][0])
    spool.close()
    # What a killed writer leaves: data files no committed row refers to. The last one
    # may be another spool's it has not committed yet: it goes once this one writes on.
    (tmp_path / "s.db-data.6").write_bytes(b"half a row")
    (tmp_path / "s.db-data.7").write_bytes(b"half a row")
    again = Spool(path, 1000)
    assert data_files(path) == ["s.db-data.7"]
    again.append(msgs("c", pad=TABLE_MAX_BYTES), 0.0)
    assert data_files(path) == ["s.db-data.8"]  # never a number an old file had
    assert [m.payload[:1] for m in payloads_of(again)] == [b"c"]
    again.close()


def test_a_row_whose_bytes_are_gone_reads_as_expired_and_is_counted(tmp_path: Path) -> None:
    """What a power loss can leave (the data file is not fsynced): short or wrong bytes are
    never published; the row's messages read as expired (dropped and counted by the
    output) and :attr:`Spool.damaged` counts them, once however often they are read."""
    path = tmp_path / "s.db"
    spool = Spool(path, 1000)
    spool.append(msgs("a", "b", pad=TABLE_MAX_BYTES), 0.0)
    spool.append(msgs("c", "d", pad=TABLE_MAX_BYTES), 0.0)
    ((first_end,),) = spool._db.execute("SELECT file_at + file_len FROM batches LIMIT 1")
    spool.close()
    data = path.with_name("s.db-data.1")
    whole = data.read_bytes()
    data.write_bytes(whole[:10] + b"!" + whole[11:])  # the first row's bytes changed
    again = Spool(path, 1000)
    for _ in range(2):
        _, rows = again.read(-(2**62), 10, 5.0)
        assert [(m.topic, m.expiry_s is not None and m.expiry_s <= 0) for _, m in rows] == [
            ("", True),
            ("", True),
            ("t/c", False),
            ("t/d", False),
        ]
    assert again.damaged == 2
    again.close()
    data.write_bytes(whole[: first_end + 10])  # the second row's bytes cut short
    third = Spool(path, 1000)
    assert [m.topic for m in payloads_of(third)] == ["t/a", "t/b", "", ""]
    assert third.damaged == 2
    third.close()


def test_a_spool_from_before_data_files_gains_their_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    big = msgs("old", pad=2 * TABLE_MAX_BYTES)  # an old large row: in the table
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, count INTEGER NOT NULL,"
            " skip INTEGER NOT NULL DEFAULT 0, spooled_at REAL NOT NULL, messages BLOB NOT NULL)"
        )
        db.execute(
            "INSERT INTO batches (count, spooled_at, messages) VALUES (1, 0, ?)", (_pack(big),)
        )
    spool = Spool(path, 1000)
    spool.append(msgs("new", pad=2 * TABLE_MAX_BYTES), 0.0)
    assert payloads_of(spool) == [*big, *msgs("new", pad=2 * TABLE_MAX_BYTES)]
    spool.close()
    again = Spool(path, 1000)
    assert payloads_of(again) == [*big, *msgs("new", pad=2 * TABLE_MAX_BYTES)]
    again.close()
