"""The receiver groups its commits when blocks arrive faster than COMMIT_EVERY_S.

A block delivered within COMMIT_EVERY_S of the last commit waits for the next
one: its messages are not in the spool and its positions not saved until
then (so a receiver killed meanwhile reads its datagrams back from the
socket, test_receiver_kill.py), and a receiver stopping commits what waits.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import receiver.app
from diode.config.link import LinkSettings
from diode.encoder import Encoder
from diode.records import Record, Sample, TagInfo, ValueType
from diode.replay import StreamState, unpack_states
from diode.wire import parse_datagram
from receiver.app import POSITIONS, Receiver, load_positions
from receiver.link import Drain
from receiver.spool import Spool
from tests.e2e import STREAM, Plant, wait_until
from tests.support.mosquitto import Mosquitto


@dataclass
class Grouped:
    """A plant whose receiver groups commits 30 s apart, and a transmitter's encoder."""

    plant: Plant
    encoder: Encoder
    sock: socket.socket


@pytest.fixture
async def grouped(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Grouped]:
    monkeypatch.setattr(receiver.app, "COMMIT_EVERY_S", 30.0, raising=False)
    plant = Plant(tmp_path, mosquitto.port)
    encoder = Encoder(
        link=LinkSettings(), key=plant.key(), stream_id=STREAM, epoch=int(time.time() * 1000)
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        yield Grouped(plant, encoder, sock)
    finally:
        sock.close()
        await plant.close()


def _send(encoder: Encoder, sock: socket.socket, port: int, records: list[Record]) -> None:
    for record in records:
        encoder.add(record, time.monotonic())
    encoder.flush()
    for block in encoder.take():
        for datagram in block.datagrams:
            sock.sendto(datagram, ("127.0.0.1", port))


async def _first_block_committed(
    plant: Plant, encoder: Encoder, sock: socket.socket
) -> tuple[Receiver, StreamState]:
    """A receiver started, a first block sent after a quiet spell: committed at once."""
    rx = await plant.start_rx()
    tag = TagInfo(tag_id=1, name="t1", device="plc1", value_type=ValueType.INT64)
    _send(encoder, sock, plant.rx_port, [tag, Sample(tag_id=1, ts_ns=time.time_ns(), value=1)])
    await wait_until(lambda: STREAM in load_positions(rx.output))
    return rx, load_positions(rx.output)[STREAM]


def _saved_next_seq(tmp_path: Path) -> int:
    """The stream's next sequence the receiver's last commit saved."""
    spool = Spool(tmp_path / "rx-state" / "spool.sqlite", 1000)
    try:
        saved = spool.meta(POSITIONS)
    finally:
        spool.close()
    assert saved is not None
    return unpack_states(saved)[STREAM].next_seq


async def test_a_block_soon_after_a_commit_waits_for_the_next_with_its_positions(
    tmp_path: Path, grouped: Grouped
) -> None:
    plant, encoder, sock = grouped.plant, grouped.encoder, grouped.sock
    rx, first = await _first_block_committed(plant, encoder, sock)
    spooled = rx.output.counters["spooled"]
    delivered = rx.decoder.counters["records_delivered"]

    _send(encoder, sock, plant.rx_port, [Sample(tag_id=1, ts_ns=time.time_ns(), value=2)])
    await wait_until(lambda: rx.decoder.counters["records_delivered"] > delivered)
    # Delivered, and waiting: neither its message nor its position is on disk yet.
    assert load_positions(rx.output)[STREAM] == first
    assert rx.output.counters["spooled"] == spooled

    await plant.stop("rx")  # stopping commits what waits
    assert rx.output.counters["spooled"] > spooled
    assert _saved_next_seq(tmp_path) == first.next_seq + 1


def _watched(sock: socket.socket) -> bool:
    """Is the running event loop watching ``sock`` for reading?"""
    try:
        key = asyncio.get_running_loop()._selector.get_key(sock)  # type: ignore[attr-defined]
    except KeyError:
        return False
    return bool(key.events & selectors.EVENT_READ)


async def test_the_link_is_not_read_again_while_its_datagrams_wait_for_the_commit(
    tmp_path: Path, grouped: Grouped
) -> None:
    # The journal keeps a waiting block's datagrams in the kernel's queue, so the
    # socket stays readable with nothing new in it: the receiver stops watching it
    # until the grouped commit instead of reading nothing at every turn of the loop.
    # What arrives meanwhile is read when the commit is made (here: at the stop).
    plant, encoder, sock = grouped.plant, grouped.encoder, grouped.sock
    rx, first = await _first_block_committed(plant, encoder, sock)
    assert _watched(rx.sock)

    delivered = rx.decoder.counters["records_delivered"]
    _send(encoder, sock, plant.rx_port, [Sample(tag_id=1, ts_ns=time.time_ns(), value=2)])
    await wait_until(lambda: rx.decoder.counters["records_delivered"] > delivered)
    await wait_until(lambda: not _watched(rx.sock))
    assert rx.drain.pending > 0  # still in the kernel's queue, uncommitted

    datagrams = rx.decoder.counters["datagrams"]
    _send(encoder, sock, plant.rx_port, [Sample(tag_id=1, ts_ns=time.time_ns(), value=3)])
    await plant.stop("rx")  # reads the third block, then commits all that waits
    assert rx.decoder.counters["datagrams"] > datagrams
    assert _saved_next_seq(tmp_path) == first.next_seq + 2
    sock.close()
    await plant.close()


async def test_a_block_waiting_for_its_missing_datagrams_is_not_read_at_every_turn(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One datagram of a block of several, the others never sent: the journal keeps it in
    # the kernel's queue until the block's reorder timeout, and the socket stays readable
    # with nothing new in it. The receiver reads it again every HELD_READ_EVERY_S, not at
    # every turn of the event loop (about 120 000 reads of nothing a second here).
    feeds = 0
    feed = Drain.feed

    def counted(self: Drain, *args: Any, **kwargs: Any) -> int:
        nonlocal feeds
        feeds += 1
        return feed(self, *args, **kwargs)

    monkeypatch.setattr(Drain, "feed", counted)
    plant = Plant(tmp_path, mosquitto.port, rx_overrides={"reorder_timeout_s": 10.0})
    encoder = Encoder(
        link=LinkSettings(), key=plant.key(), stream_id=STREAM, epoch=int(time.time() * 1000)
    )
    tag = TagInfo(tag_id=1, name="t1", device="plc1", value_type=ValueType.INT64)
    for value in range(2000):
        encoder.add(Sample(tag_id=1, ts_ns=time.time_ns(), value=value) if value else tag, 0.0)
    encoder.flush()
    (block,) = encoder.take()
    assert parse_datagram(block.datagrams[0])[0].k > 1  # one datagram cannot complete it
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx = await plant.start_rx()
        sock.sendto(block.datagrams[0], ("127.0.0.1", plant.rx_port))
        await wait_until(lambda: rx.drain.pending == 1)
        feeds = 0
        await asyncio.sleep(0.5)
        assert rx.drain.pending == 1  # still held: the block still waits for the rest
        assert 10 < feeds < 2_000, feeds  # read again (every millisecond), but not spinning
    finally:
        sock.close()
        await plant.close()
