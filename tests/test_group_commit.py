"""The receiver groups its commits when blocks arrive faster than COMMIT_EVERY_S.

A block delivered within COMMIT_EVERY_S of the last commit waits for the next
one: its messages are not in the spool and its positions not saved until
then (so a receiver killed meanwhile reads its datagrams back from the
socket, test_receiver_kill.py), and a receiver stopping commits what waits.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

import receiver.app
from diode.config.link import LinkSettings
from diode.encoder import Encoder
from diode.records import Record, Sample, TagInfo, ValueType
from diode.replay import unpack_states
from receiver.app import POSITIONS, load_positions
from receiver.spool import Spool
from tests.e2e import STREAM, Plant, wait_until
from tests.support.mosquitto import Mosquitto


def _send(encoder: Encoder, sock: socket.socket, port: int, records: list[Record]) -> None:
    for record in records:
        encoder.add(record, time.monotonic())
    encoder.flush()
    for block in encoder.take():
        for datagram in block.datagrams:
            sock.sendto(datagram, ("127.0.0.1", port))


async def test_a_block_soon_after_a_commit_waits_for_the_next_with_its_positions(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(receiver.app, "COMMIT_EVERY_S", 30.0, raising=False)
    plant = Plant(tmp_path, mosquitto.port)
    encoder = Encoder(
        link=LinkSettings(), key=plant.key(), stream_id=STREAM, epoch=int(time.time() * 1000)
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx = await plant.start_rx()
        tag = TagInfo(tag_id=1, name="t1", device="plc1", value_type=ValueType.INT64)
        _send(encoder, sock, plant.rx_port, [tag, Sample(tag_id=1, ts_ns=time.time_ns(), value=1)])
        # The first block after a quiet spell is committed at once.
        await wait_until(lambda: STREAM in load_positions(rx.output))
        first = load_positions(rx.output)[STREAM]
        spooled = rx.output.counters["spooled"]
        delivered = rx.decoder.counters["records_delivered"]

        _send(encoder, sock, plant.rx_port, [Sample(tag_id=1, ts_ns=time.time_ns(), value=2)])
        await wait_until(lambda: rx.decoder.counters["records_delivered"] > delivered)
        # Delivered, and waiting: neither its message nor its position is on disk yet.
        assert load_positions(rx.output)[STREAM] == first
        assert rx.output.counters["spooled"] == spooled

        await plant.stop("rx")  # stopping commits what waits
        assert rx.output.counters["spooled"] > spooled
        spool = Spool(tmp_path / "rx-state" / "spool.sqlite", 1000)
        try:
            saved = spool.meta(POSITIONS)
        finally:
            spool.close()
        assert saved is not None
        assert unpack_states(saved)[STREAM].next_seq == first.next_seq + 1
    finally:
        sock.close()
        await plant.close()
