"""The SQLite spool: order, bound, persistence, expiry."""

from __future__ import annotations

from pathlib import Path

from receiver.payload import Message
from receiver.spool import Spool


def msgs(*names: str, expiry: int | None = None) -> list[Message]:
    return [Message(f"t/{n}", n.encode(), 1, True, expiry) for n in names]


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
    spool.append(msgs("new", expiry=10), 105.0)
    _, rows = spool.read(-(2**62), 10, 112.0)
    assert [(m.payload, m.expiry_s) for _, m in rows] == [(b"new", 3)]
    assert spool.expired == 1
    assert len(spool) == 1
